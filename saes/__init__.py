"""saes: dictionaries that learn sparse features from activations."""

from saes.base import REGISTRY, Dictionary, DictionaryConfig, DictOutput, get_architecture, load_dictionary, register
from saes.metrics import evaluate
from saes.train import train

__all__ = ["REGISTRY", "DictOutput", "Dictionary", "DictionaryConfig", "evaluate", "get_architecture",
           "load_dictionary", "register", "train"]
