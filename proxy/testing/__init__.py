"""A fake OpenAI API for tests, benchmarks and `python -m proxy demo`: one source for all three."""

from proxy.testing.fake_openai import FakeOpenAI

__all__ = ["FakeOpenAI"]
