"""`realm serve`: the answering path over HTTP."""
