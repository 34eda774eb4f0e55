"""Serving: Ray Serve hosts engines behind the Open Inference Protocol (KServe v2 REST) on HTTP.

`serving.config` (what to serve), `serving.protocol` (the wire codec), `serving.model` (one deployment per
model version, batching into its `Engine`), `serving.app` (the HTTP ingress), `serving.cluster` (a local
cluster for `patchwatch serve`, tests and benchmarks), `serving.client` (a client and `RemoteEngine`).
Importing this package does not import Ray; the modules that need it do.
"""
