"""Text corpora and sentence splitting."""
from lgdlm_ds.corpus import LEE_BACKGROUND, corpus_path, read_sentences, split_sentences


def test_sentence_splitter_keeps_abbreviations_and_initials():
    text = 'Mr. Howard said the U.S. Senate met on Jan. 5. J. Smith agreed!  Did he?  "Yes," she said. It rained.'
    assert split_sentences(text) == ["Mr. Howard said the U.S. Senate met on Jan. 5.", "J. Smith agreed!",
                                     "Did he?", '"Yes," she said.', "It rained."]


def test_default_corpus_is_read_from_the_installed_gensim_package():
    path = corpus_path(LEE_BACKGROUND)
    assert path.name == "lee_background.cor" and "gensim" in path.parts
    assert sum(1 for _ in read_sentences(path)) == 2680
