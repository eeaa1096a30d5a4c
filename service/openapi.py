"""Print the API's OpenAPI document as YAML: `python -m service.openapi > openapi.yaml`."""

import sys

import yaml

from service.main import create_app
from service.settings import Settings


def openapi_yaml() -> str:
    # Fixed settings: the document must not depend on the machine that generates it.
    app = create_app(Settings(var_dir="/var/lib/consa"))
    return yaml.safe_dump(app.openapi(), sort_keys=False, allow_unicode=True, width=100)


if __name__ == "__main__":
    sys.stdout.write(openapi_yaml())
