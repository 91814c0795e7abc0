"""`python -m sslfg.study`: the whole comparison (the code: sslfg/study/run.py)."""

from sslfg.entrypoints import launch

if __name__ == "__main__":
    launch("sslfg.study.run")
