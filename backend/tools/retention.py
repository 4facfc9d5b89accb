"""Install or verify the S3 lifecycle rule that expires unpicked candidates.

    cd backend && python -m tools.retention install   # the rule CANDIDATE_RETENTION_DAYS asks for
    cd backend && python -m tools.retention verify    # exit 1 unless the bucket has exactly it

With CANDIDATE_RETENTION_DAYS unset, `install` removes the rule. The bucket's other lifecycle
rules are kept. In local mode there is nothing to install: the API sweeps expired candidates.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from botocore.exceptions import BotoCoreError, ClientError

from config import settings_or_exit
from services.asset_persistence import install_lifecycle_rule, lifecycle_problem
from services.storage import make_s3_client


def main(argv: Sequence[str] | None = None) -> int:
    """Run `install` or `verify`; the exit status says whether the bucket matches the setting."""
    parser = argparse.ArgumentParser(prog="python -m tools.retention", description=__doc__)
    parser.add_argument("command", choices=["install", "verify"])
    args = parser.parse_args(argv)
    settings = settings_or_exit()
    days = settings.candidate_retention_days
    if settings.storage_backend != "s3" or settings.storage_bucket is None:
        state = f"after {days} days" if days else "never (CANDIDATE_RETENTION_DAYS is unset)"
        print(f"local storage: the API deletes unpicked candidates {state}; nothing to install")
        return 0
    bucket = settings.storage_bucket
    client = make_s3_client(region=settings.aws_region, endpoint_url=settings.aws_endpoint_url)
    try:
        if args.command == "install":
            install_lifecycle_rule(client, bucket, days)
        problem = lifecycle_problem(client, bucket, days)
    except (BotoCoreError, ClientError) as error:
        print(f"error: s3://{bucket}: {error}", file=sys.stderr)
        return 1
    if problem is not None:
        print(f"error: s3://{bucket}: {problem}", file=sys.stderr)
        return 1
    state = f"expire after {days} days" if days else "never expire (no rule)"
    print(f"s3://{bucket}: unpicked candidates (character_references/) {state}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
