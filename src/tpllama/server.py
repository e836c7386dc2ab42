"""OpenAI-compatible HTTP server (``tpllama serve``)."""


def add_arguments(p) -> None:
    from .cli import add_model_args

    add_model_args(p)


def main(a) -> int:
    raise ValueError("tpllama serve is not available yet")
