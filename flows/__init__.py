"""Prefect flows of the memoe pipeline (``flows/study.py``) and the pipeline's commands
(``memoe run``, ``memoe ui``)."""
