"""The base of every error a user can act on (bad input, a missing or damaged file, a port in use): `realm` prints
its message and exits 2, without a traceback. Anything else is a bug and keeps its traceback."""


class RealmError(Exception):
    pass
