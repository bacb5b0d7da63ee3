#!/usr/bin/env python3
"""Validate a docker-compose file against the Compose specification's JSON schema, and print its
services (after YAML anchors and merges) as JSON for further checks.

usage: validate_compose.py COMPOSE.yml SCHEMA.json
"""
import json
import sys

import jsonschema
import yaml


def main(compose_path, schema_path):
    with open(compose_path) as f:
        doc = yaml.safe_load(f)
    with open(schema_path) as f:
        schema = json.load(f)
    validator = jsonschema.Draft201909Validator(schema)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
    for e in errors:
        where = "/".join(str(p) for p in e.path) or "(top)"
        print(f"{compose_path}: {where}: {e.message}", file=sys.stderr)
    if errors:
        return 1
    json.dump(doc, sys.stdout)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
