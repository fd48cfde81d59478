//! Counters and gauges, through the [`metrics`] facade: install any exporter (Prometheus,
//! StatsD, …) and they appear. Nothing is recorded without one.
//!
//! | counter | labels | counts |
//! |---|---|---|
//! | `tower_pg_session_loads_total` | `result`: `found`, `missing` | session reads (one each; several may share a statement) |
//! | `tower_pg_session_touches_total` | `written`: `true`, `false` | found sessions whose idle expiry was (or did not need to be) rewritten |
//! | `tower_pg_session_saves_total` | `kind`: `insert`, `update`, `merge` | writes; `merge` re-applied changes after a concurrent write |
//! | `tower_pg_session_conflicts_retried_total` | | saves that met a concurrent write |
//! | `tower_pg_session_pruned_total` | | expired rows deleted |
//! | `tower_pg_session_logins_total` | | completed OIDC logins |
//! | `tower_pg_session_refreshes_total` | | access-token refreshes at the provider |
//! | `tower_pg_session_logouts_total` | `kind`: `local`, `backchannel` | logouts |
//! | `tower_pg_session_failures_total` | `reason` | failures by reason (`store_unavailable`, `too_large`, `bad_cookie`, `corrupt_data`, `ended_concurrently`, `login_<kind>`, `refresh_<kind>`, `login_record_tampered`, `login_record_unsealed`, `backchannel_rejected`) |
//! | `tower_pg_session_vault_refreshes_total` | `integration` | token-vault refreshes at the provider |
//! | `tower_pg_session_vault_failures_total` | `integration`, `reason` | token-vault failures (`needs_reconsent`, `provider_unavailable`, `rejected`, `invalid_response`, `unreadable`, …) |
//!
//! | gauge | labels | value |
//! |---|---|---|
//! | `tower_pg_session_vault_tokens` | `integration` | users with tokens stored, as of the last `TokenVault::record_gauges` |
//! | `tower_pg_session_vault_needs_reconsent` | `integration` | of those, how many must connect again |

pub(crate) fn load(found: bool) {
    let result = if found { "found" } else { "missing" };
    metrics::counter!("tower_pg_session_loads_total", "result" => result).increment(1);
}

pub(crate) fn touch(written: bool) {
    let written = if written { "true" } else { "false" };
    metrics::counter!("tower_pg_session_touches_total", "written" => written).increment(1);
}

pub(crate) fn save(kind: &'static str) {
    metrics::counter!("tower_pg_session_saves_total", "kind" => kind).increment(1);
}

pub(crate) fn conflict() {
    metrics::counter!("tower_pg_session_conflicts_retried_total").increment(1);
}

pub(crate) fn pruned(rows: u64) {
    metrics::counter!("tower_pg_session_pruned_total").increment(rows);
}

#[cfg_attr(not(feature = "oidc"), allow(dead_code))]
pub(crate) fn login() {
    metrics::counter!("tower_pg_session_logins_total").increment(1);
}

#[cfg_attr(not(feature = "oidc"), allow(dead_code))]
pub(crate) fn refresh() {
    metrics::counter!("tower_pg_session_refreshes_total").increment(1);
}

#[cfg_attr(not(feature = "oidc"), allow(dead_code))]
pub(crate) fn logout(kind: &'static str) {
    metrics::counter!("tower_pg_session_logouts_total", "kind" => kind).increment(1);
}

pub(crate) fn failure(reason: impl Into<metrics::SharedString>) {
    metrics::counter!("tower_pg_session_failures_total", "reason" => reason.into()).increment(1);
}

#[cfg(feature = "oidc")]
pub(crate) fn vault_refresh(integration: &str) {
    metrics::counter!("tower_pg_session_vault_refreshes_total", "integration" => integration.to_owned())
        .increment(1);
}

#[cfg(feature = "oidc")]
pub(crate) fn vault_failure(integration: &str, reason: &'static str) {
    metrics::counter!(
        "tower_pg_session_vault_failures_total",
        "integration" => integration.to_owned(),
        "reason" => reason
    )
    .increment(1);
}

#[cfg(feature = "oidc")]
pub(crate) fn vault_tokens(integration: &str, tokens: u64, needs_reconsent: u64) {
    // Gauges are f64; counts of rows stay exact far beyond any table's size.
    #[allow(clippy::cast_precision_loss)]
    let (tokens, reconsent) = (tokens as f64, needs_reconsent as f64);
    metrics::gauge!("tower_pg_session_vault_tokens", "integration" => integration.to_owned())
        .set(tokens);
    metrics::gauge!(
        "tower_pg_session_vault_needs_reconsent",
        "integration" => integration.to_owned()
    )
    .set(reconsent);
}
