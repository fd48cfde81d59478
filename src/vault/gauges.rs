//! The vault's gauges: stored tokens per integration.

use super::{TokenVault, VaultError};
use crate::metrics;

/// Stored connections of one integration, as [`TokenVault::record_gauges`]
/// counted them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TokenCount {
    /// The integration's name.
    pub integration: String,
    /// Users with tokens stored for it.
    pub tokens: u64,
    /// Of those, how many must connect again (the provider refused the
    /// refresh token).
    pub needs_reconsent: u64,
}

impl TokenVault {
    /// Counts the stored tokens per integration and sets the gauges
    /// `tower_pg_session_vault_tokens` and
    /// `tower_pg_session_vault_needs_reconsent` (label `integration`; 0 for
    /// a configured integration nobody connected). One statement, one pass
    /// over the table and nothing per request: call it on a timer (once a
    /// minute is plenty), from one instance or all, as the counts are the
    /// table's, not the process's.
    ///
    /// # Errors
    /// [`VaultError::Store`].
    pub async fn record_gauges(&self) -> Result<Vec<TokenCount>, VaultError> {
        let rows = self.inner.sql.token_counts(&self.inner.pool).await?;
        let mut counts: Vec<TokenCount> = rows
            .into_iter()
            .map(|(integration, tokens, reconsent)| TokenCount {
                integration,
                tokens: u64::try_from(tokens).unwrap_or(0),
                needs_reconsent: u64::try_from(reconsent).unwrap_or(0),
            })
            .collect();
        for name in self.inner.integrations.keys() {
            if !counts.iter().any(|c| &c.integration == name) {
                counts.push(TokenCount {
                    integration: name.clone(),
                    tokens: 0,
                    needs_reconsent: 0,
                });
            }
        }
        counts.sort_by(|a, b| a.integration.cmp(&b.integration));
        for c in &counts {
            metrics::vault_tokens(&c.integration, c.tokens, c.needs_reconsent);
        }
        Ok(counts)
    }
}
