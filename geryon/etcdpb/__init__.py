"""Generated from proto/geryon/etcdpb/ by `make proto`: a subset of etcd's v3 API.
Never edit; imported only by geryon.store.etcd_rpc."""
