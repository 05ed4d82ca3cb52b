"""``register_model`` as a no-op decorator."""


def register_model(function):
    return function
