"""The rating scale and the question of the trust study: written here once, read by the store (its CHECK
constraint and answer check), the statistics, the HTTP schemas and, through the API, the rater's page.

The Grad-CAM paper's five-point scale (Selvaraju et al., ICCV 2017, section 5.2), from +2 to -2: the
answer says how much more reliable Robot A looks than Robot B.
"""

from __future__ import annotations

#: The question each pair asks; {class} is the class both robots predicted.
QUESTION = "Both robots recognised this image as \u201c{class}\u201d. Which robot is more reliable?"

#: (answer, the wording shown to raters), from the top of the scale down.
SCALE: tuple[tuple[int, str], ...] = (
    (2, "Robot A is clearly more reliable than Robot B"),
    (1, "Robot A is slightly more reliable than Robot B"),
    (0, "Robot A and Robot B are equally reliable"),
    (-1, "Robot A is slightly less reliable than Robot B"),
    (-2, "Robot A is clearly less reliable than Robot B"),
)

#: The answers of :data:`SCALE`, in its order.
ANSWERS: tuple[int, ...] = tuple(answer for answer, _ in SCALE)
#: The lowest and highest answer.
LOWEST, HIGHEST = min(ANSWERS), max(ANSWERS)
