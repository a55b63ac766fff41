"""Grafana dashboards generated from code (arrives with the dashboards issue)."""
