"""U2++ decoding: CTC greedy / prefix beam search, attention rescoring, streaming."""
