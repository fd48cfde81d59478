//! The vault's table: its DDL and its creation at start-up.

use sqlx::PgPool;

use crate::{
    store::{
        schema::{Ident, TableName},
        Pooler, StoreError,
    },
    ConfigError,
};

/// The default table name.
pub(crate) const DEFAULT_TABLE: &str = "oauth_tokens";

/// Builds the validated, qualified table name.
pub(crate) fn table_name(schema: Option<&str>, table: &str) -> Result<TableName, ConfigError> {
    Ok(TableName {
        schema: schema.map(Ident::new).transpose()?,
        table: Ident::new(table)?,
    })
}

/// Creates the table when missing, and adds the columns later versions
/// added to an existing one. Serialised by an advisory lock and idempotent,
/// so many instances starting at once neither fail nor race; at start-up
/// with everything in place it costs one read.
pub(crate) async fn prepare(
    pool: &PgPool,
    name: &TableName,
    pooler: Pooler,
) -> Result<(), StoreError> {
    let persistent = pooler == Pooler::Direct;
    let mut conn = pooler.conn(pool).await?;
    let complete: bool = sqlx::query_scalar(
        "SELECT to_regclass($1) IS NOT NULL AND (SELECT count(*) FROM pg_attribute \
           WHERE attrelid = to_regclass($1) AND attname = ANY($2) AND NOT attisdropped) = $3",
    )
    .persistent(persistent)
    .bind(name.qualified())
    .bind(ADDED_COLUMNS.iter().map(|(c, _)| *c).collect::<Vec<_>>())
    .bind(ADDED_COLUMNS.len() as i64)
    .fetch_one(conn.get())
    .await?;
    conn.done().await?;
    if complete {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .persistent(persistent)
        .bind(name.lock_key("vault-ddl"))
        .execute(&mut *tx)
        .await?;
    // Adding a nullable column is a catalog change, but it needs a moment of
    // exclusive lock: give up rather than queue behind a long transaction
    // (and stall every query queued behind this one).
    sqlx::query("SET LOCAL lock_timeout = '5s'")
        .persistent(persistent)
        .execute(&mut *tx)
        .await?;
    for statement in ddl(name) {
        sqlx::query(&statement)
            .persistent(persistent)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Columns added after the first version of the table, with their types:
/// nullable, so existing rows need no rewrite.
const ADDED_COLUMNS: [(&str, &str); 2] = [("connect_ip", "inet"), ("connect_user_agent", "text")];

/// Sealed tokens per (user, integration); everything else is metadata that
/// listings and operators may read.
fn ddl(name: &TableName) -> Vec<String> {
    let t = name.qualified();
    let mut out: Vec<String> = name.schema_ddl().into_iter().collect();
    out.push(format!(
        "CREATE TABLE IF NOT EXISTS {t} (\
           user_id text NOT NULL, \
           integration text NOT NULL, \
           access_token text NOT NULL, \
           refresh_token text, \
           expires_at timestamptz, \
           scopes text[] NOT NULL DEFAULT '{{}}', \
           token_type text NOT NULL DEFAULT 'Bearer', \
           needs_reconsent_at timestamptz, \
           created_at timestamptz NOT NULL DEFAULT now(), \
           updated_at timestamptz NOT NULL DEFAULT now(), \
           last_used_at timestamptz, \
           last_refreshed_at timestamptz, \
           PRIMARY KEY (user_id, integration))"
    ));
    for (column, kind) in ADDED_COLUMNS {
        out.push(format!(
            "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {column} {kind}"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated_and_quoted() {
        let name = table_name(Some("auth"), DEFAULT_TABLE).expect("valid");
        assert_eq!(name.qualified(), "\"auth\".\"oauth_tokens\"");
        assert!(table_name(None, "x; drop").is_err());
        let ddl = ddl(&name);
        assert!(ddl[1].contains("PRIMARY KEY (user_id, integration)"));
        assert!(ddl[2].ends_with("ADD COLUMN IF NOT EXISTS connect_ip inet"));
    }
}
