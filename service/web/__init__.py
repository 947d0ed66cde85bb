"""The review web app (FastAPI, server-rendered pages, JSON API): see app.py."""
