"""The data plane: what one inference request does, stage by stage.

`Dispatcher` takes one `Snapshot` of the serving state per request (a hot reload swaps the
whole repository; a request never mixes two configs) and runs it through admission, input
checks, the member calls (`fanout`), the ensemble's selection stages (`ensemble_run`), the
contract check (`verdict`) and the answer (`respond`). Nothing here knows HTTP or gRPC.
"""
