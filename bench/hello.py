"""The baseline: Flask's hello-world app, run by bench under gunicorn with the same worker
number and class as ``imagepub serve`` (service/gunicorn_conf.py)."""

from flask import Flask

app = Flask(__name__)


@app.get("/")
def hello():
    return "Hello, World!"
