"""Local engines for development and tests: the development broker (tansu, shipped
on PyPI) and real engines assembled from Maven Central (``tally engines``)."""
