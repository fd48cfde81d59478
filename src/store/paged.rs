//! Work over a table in keyset-ordered batches, each one short: a step
//! handles the rows after a cursor and says where the next one starts, so
//! the work is resumable and never holds a transaction across the table.

use std::future::Future;

/// What one batch did.
pub(crate) struct Step<T, C> {
    /// Its result, folded into the whole run's.
    pub(crate) done: T,
    /// Rows it handled, for progress.
    pub(crate) rows: u64,
    /// Where the next batch starts; `None` when this one reached the end.
    pub(crate) next: Option<C>,
}

/// Runs `step` from `start` until a batch reaches the end, handing each
/// batch's result to `fold` and its row count to `progress`.
pub(crate) async fn in_batches<C, T, E, Fut>(
    start: C,
    mut step: impl FnMut(C) -> Fut,
    mut fold: impl FnMut(T),
    progress: &mut impl FnMut(u64),
) -> Result<(), E>
where
    Fut: Future<Output = Result<Step<T, C>, E>>,
{
    let mut cursor = start;
    loop {
        let batch = step(cursor).await?;
        progress(batch.rows);
        fold(batch.done);
        match batch.next {
            Some(next) => cursor = next,
            None => return Ok(()),
        }
    }
}
