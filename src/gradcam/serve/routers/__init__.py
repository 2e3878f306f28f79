"""The service's routers, one per area: :mod:`.explain` (the explanation API), :mod:`.study` (what raters
call), :mod:`.admin` (study administration, behind the admin token) and :mod:`.pages` (the web app's
pages). Shared resources come from :mod:`gradcam.serve.dependencies`; errors are mapped by
:mod:`gradcam.serve.errors`."""
