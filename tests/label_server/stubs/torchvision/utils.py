"""The two names ``monailabel.transform.post`` imports; they fail loudly if anything calls them."""


def make_grid(*args, **kwargs):
    raise RuntimeError("torchvision stand-in: make_grid is not available in the test server environment")


def save_image(*args, **kwargs):
    raise RuntimeError("torchvision stand-in: save_image is not available in the test server environment")
