"""The outputs folder: where things live, cache entries written safely under concurrency, their manifests, JSON records several processes update, disk space."""
