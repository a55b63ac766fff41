"""Grafana dashboards generated from code (build.py), their macro expansion (render.py), checks (validate.py) and
upload (push.py); ``compression dashboards`` (cli.py). See docs/dashboards.md."""
