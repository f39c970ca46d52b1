# Inference latency and throughput of each checkpoint against the dense source model.
