#!/usr/bin/env bash
# RabbitMQ users for a production modelyard, and what each may touch.
#
# The point: a producer may publish jobs to the submit exchange
# (`modelyard.jobs`) and read its own result queues, nothing else. It cannot
# publish to a worker pool (`modelyard.dispatch`) or to the router's internal
# path (`modelyard.internal`, where retries and fallbacks come back already
# admitted), so every job it sends passes admission: its key is checked, its
# model approved, its budget reserved.
#
# Permissions are three regular expressions over resource names: configure
# (declare, delete), write (publish to an exchange, bind a queue), read
# (consume a queue, bind from an exchange). Producers connect with
# `Client.connect(url, declare=False)`; the topology is declared by the
# modelyard processes (or imported from rabbitmq-definitions.json).
#
# Usage: VHOST=/ PRODUCER_PASSWORD=... SERVICE_PASSWORD=... deploy/rabbitmq-users.sh
# (PRODUCER_USER and SERVICE_USER name the users: producer and modelyard.)
set -euo pipefail

VHOST="${VHOST:-/}"
PRODUCER_USER="${PRODUCER_USER:-producer}"
SERVICE_USER="${SERVICE_USER:-modelyard}"
: "${PRODUCER_PASSWORD:?set PRODUCER_PASSWORD}"
: "${SERVICE_PASSWORD:?set SERVICE_PASSWORD}"

add_user() {  # name password
    rabbitmqctl add_user "$1" "$2" 2>/dev/null || rabbitmqctl change_password "$1" "$2"
}

# The modelyard processes (router, workers, ledger, CLI): everything in the vhost.
add_user "$SERVICE_USER" "$SERVICE_PASSWORD"
rabbitmqctl set_permissions -p "$VHOST" "$SERVICE_USER" '.*' '.*' '.*'

# A producer (a batch pipeline, a backend service).
#   configure: its own result queues (private `reply.<id>` for complete() and
#              stream(), durable `batch.<id>` or names it chooses with a
#              `results.` prefix for submit_many)
#   write:     the submit exchange, and its own queues (to bind nothing else)
#   read:      its own queues
add_user "$PRODUCER_USER" "$PRODUCER_PASSWORD"
rabbitmqctl set_permissions -p "$VHOST" "$PRODUCER_USER" \
    '^(reply|batch|results)\..*' \
    '^(modelyard\.jobs|(reply|batch|results)\..*)$' \
    '^(reply|batch|results)\..*'

# The default exchange (publishing straight to a queue by name) is open to
# every user with write permission on that queue: the producer's pattern
# names only its own queues, so it cannot drop jobs onto `worker.*` or
# `router.internal` that way either.
