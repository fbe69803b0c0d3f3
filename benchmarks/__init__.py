"""mpsd's benchmark harness: mpsd beside in-process decoding, threads and peers, in one run."""
