//! The backend conformance suite against the in-memory backend.

#![allow(clippy::expect_used)]

use geostate_backends::{suite, Layout, MemoryBackend};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_backend_passes_the_suite() {
    suite::test_all(|| async { MemoryBackend::new(Layout::default()) }).await;
}

/// Few partitions and buckets: many keys share each feed, lock and digest bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_backend_passes_the_suite_with_few_partitions() {
    let layout = Layout::new(4, 4, 8 * 1024 * 1024, 20_000).expect("a valid layout");
    suite::test_all(|| async { MemoryBackend::new(layout.clone()) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_backend_passes_the_small_layout_cases() {
    suite::test_small_layout(|| async { MemoryBackend::new(suite::small_layout()) }).await;
}
