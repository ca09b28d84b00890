"""The web pages of `tuneship serve`: server-rendered Jinja2 templates, vendored static files, no build step.

`pages.mount_web(app, runs_dir)` adds the pages to any FastAPI app; write actions go through the app's own /v1 API
from the browser, with the API key the person typed (kept in sessionStorage, sent as a bearer token).
"""
