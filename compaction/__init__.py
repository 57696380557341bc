"""Compaction: the watcher that keeps late-written and fragmented partitions healthy.

The compaction primitive itself (replace segments of one partition atomically)
belongs to each storage backend; see ``storage.embedded.store.EmbeddedStore.compact``.
"""
