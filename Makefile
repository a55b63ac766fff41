# The two commands of the README. Each sets itself up on a fresh Debian/Ubuntu
# machine (scripts/bootstrap: OS packages, .venv, the package), then runs.
.PHONY: demo test lint bench bootstrap clean screenshots

bootstrap:
	@scripts/bootstrap

demo: bootstrap
	.venv/bin/compression demo --keep

test: bootstrap
	.venv/bin/ruff check .
	.venv/bin/mypy
	.venv/bin/lint-imports
	.venv/bin/python -m pytest

lint: bootstrap
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy
	.venv/bin/lint-imports

# The README's pictures (docs/screenshots/): a demo run, then Today, a patient page and an alert e-mail in Chromium.
screenshots: bootstrap
	.venv/bin/python scripts/screenshots.py

bench: bootstrap
	.venv/bin/python bench/ingest_bench.py

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache .hypothesis
