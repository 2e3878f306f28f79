"""Which model do people trust more? The Grad-CAM paper's human study, run as a web service.

Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization",
ICCV 2017, section 5.2 ("Evaluating Trust"): raters saw the explanations of two models, VGG-16 (the
stronger) and AlexNet, for images both classify the same way, and rated which one they trust more on a
five-point scale. With Guided Grad-CAM they rated the stronger model +1.27 on -2..+2 (Guided
Backpropagation: +1.00): better explanations let people tell the better model, although both made the
same prediction.

The protocol here:

1. An admin creates a study: a stronger and a weaker model, one or more visualisation methods (any CAM
   or pixel method of :mod:`gradcam.methods.registry`; the paper used guided-backprop and
   guided-gradcam), a folder of images on the server and, optionally, annotations
   (``{"<image file name>": <class index or name>}``). ``gradcam study create`` renders it at once;
   the service queues it for one background worker (:mod:`.jobs`) and answers at once, the study's
   state then going from queued through rendering (images done of total) to ready or failed.
2. Only images that both models classify as the same top-1 class (the annotated one, when given) are kept
   (:mod:`.pairs`). For each kept image and method the two pictures are rendered once, at creation, and
   stored; the models are anonymised as "Robot A" and "Robot B", with the side of the stronger model
   randomised per pair (seeded, balanced within each method).
3. Raters come by invitation: the owner issues single-person links ``/studies/<id>#<token>``
   (``gradcam study invite``, or the admin API); the token sits in the URL fragment, which browsers never
   send, and the rater page sends it as ``Authorization: Bearer``. An ``open`` study also lets raters
   join by themselves, a limited number per client address. A rater sees one pair at a time, with the
   class both robots predicted, in an order of their own, and may rate only the pair served to them;
   pair and rater ids are opaque random tokens. They answer on the paper's scale (:data:`.scale.SCALE`):
   "Robot A is clearly more reliable than Robot B" (+2), "slightly more reliable" (+1), "equally
   reliable" (0), "slightly less reliable" (-1), "clearly less reliable" (-2). Each rater rates each
   pair at most once (the database enforces it). Raters are not told which method made the pictures: the
   paper's raters saw one kind of visualisation at a time and no method names, and a name such as
   "Grad-CAM" could sway the answer.
4. Results (:mod:`.results`): per method, the mean score from the stronger model's side (the answer when
   it was Robot A, the negated answer when it was Robot B) with a percentile-bootstrap 95% interval, the
   number of ratings and of raters; the raw ratings as CSV.

The study's domain, with no HTTP in it. Modules: :mod:`.scale` (the question and the rating scale),
:mod:`.store` (the database), :mod:`.invitations` (rater credentials), :mod:`.folders` (which image
folders a service offers), :mod:`.pairs` (selection and rendering), :mod:`.creation` (a checked study
request, rendered and stored), :mod:`.jobs` (the service's bounded background worker), :mod:`.results`
(statistics and CSV). The HTTP API over it is :mod:`gradcam.serve.routers.study` and
:mod:`gradcam.serve.routers.admin`.
"""

from gradcam.study.store import DEFAULT_DB_URL, StudyStore

__all__ = ["DEFAULT_DB_URL", "StudyStore"]
