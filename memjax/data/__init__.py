"""Data: document sources, tokenizers, the packed language-model pipeline and whole-document segments."""

from memjax.data.documents import make_document_iterator
from memjax.data.pipeline import make_lm_iterator
from memjax.data.sources import DataError, build_source, split_of
from memjax.data.tokenizers import BPETokenizer, ByteTokenizer, Tokenizer, get_tokenizer

__all__ = [
    "DataError",
    "ByteTokenizer",
    "BPETokenizer",
    "Tokenizer",
    "get_tokenizer",
    "build_source",
    "make_document_iterator",
    "make_lm_iterator",
    "split_of",
]
