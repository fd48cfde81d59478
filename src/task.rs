//! Work that must finish once started.

/// Runs `work` in its own task and waits for it: a request future can be
/// dropped at any await point, and work that must finish once started (a
/// save, a commit, a `BEGIN`, a token refresh the provider has carried out)
/// runs where that cannot cut it short. `None` when the task panicked.
pub(crate) async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> Option<T> {
    tokio::spawn(work).await.ok()
}
