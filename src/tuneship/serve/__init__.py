"""`tuneship serve`: one FastAPI app (app.py) with the OpenAI-compatible chat API, feedback, loop and version
endpoints (api.py), over model backends with routing and fallback (backends.py)."""
