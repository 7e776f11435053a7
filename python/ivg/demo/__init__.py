"""`ivg demo`: the paper's controlled-sentiment experiment in miniature, built and run offline."""
