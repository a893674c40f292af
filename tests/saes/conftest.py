from .helpers import variant  # noqa: F401  (the fixture parametrised over every architecture variant)
