"""probe: everything about getting activations out of a model."""

from probe.corpus import load_corpus
from probe.errors import SteerscopeError
from probe.models import load_model
from probe.store import ActivationStore

__all__ = ["ActivationStore", "SteerscopeError", "load_corpus", "load_model"]
