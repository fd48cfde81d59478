//! The hot-path statements, one builder each, built once from the validated
//! names and the detected layout. Each builder's doc lists its parameters,
//! in the order the store binds them; `tests` pins the text per layout.

use time::OffsetDateTime;

use super::{
    batch::{self, InsertJob, UpdateJob},
    padded, prune,
    schema::{ExpireType, Layout, SessType, TableName},
    LoadParams, NewRow,
};

/// The statements, built once from the validated names and detected layout.
#[derive(Debug)]
pub(super) struct Sql {
    /// Loads of 1, 2, 4, … [`batch::MAX_KEYS`] keys, with an absolute timeout.
    pub(super) load: Vec<String>,
    /// The same without one.
    pub(super) load_idle: Vec<String>,
    /// A lone load: one key, by primary key, read only.
    pub(super) load_one: String,
    /// The same for the simple query protocol (results in text).
    load_one_text: String,
    /// Shared loads, read only: 1, 2, 4, … [`batch::MAX_KEYS`] keys.
    pub(super) load_read: Vec<String>,
    /// The same for the simple query protocol.
    load_read_text: Vec<String>,
    pub(super) insert: String,
    /// Inserts of 1, 2, 4, … [`batch::MAX_KEYS`] rows (index 0 unused).
    pub(super) insert_many: Vec<String>,
    pub(super) update: String,
    /// Updates of 1, 2, 4, … [`batch::MAX_KEYS`] rows (index 0 unused).
    pub(super) update_many: Vec<String>,
    /// The same for the simple query protocol, or calls of the function
    /// that holds it.
    update_many_text: Vec<String>,
    pub(super) select_for_update: String,
    pub(super) update_locked: String,
    pub(super) delete: String,
    pub(super) prune_batch: String,
    pub(super) prune_tied: String,
    /// Unconditional update of a live row (the tower-sessions `save`).
    #[cfg_attr(not(feature = "tower-sessions"), allow(dead_code))]
    pub(super) save_any: String,
    /// The table has the optional columns: their values are bound too.
    extended: bool,
}

/// What every builder needs: the quoted table name and its layout.
pub(super) struct Table<'a> {
    pub(super) t: String,
    pub(super) layout: &'a Layout,
    /// A condition that bounds the row lock waits of its statement (and of
    /// the rest of its transaction) without a round trip of its own. The
    /// setting is local to the transaction. Volatile, it is checked on each
    /// row the statement finds, before that row is locked; a statement that
    /// finds no row has no lock to wait for. (As a condition, not a CTE of
    /// its own, it costs Postgres less to plan and to run.)
    bound: String,
}

/// A function of the table ([`Table::save_function`]): its qualified name
/// and its creation.
#[derive(Debug)]
pub(super) struct Function {
    pub(super) name: String,
    pub(super) ddl: String,
}

impl Sql {
    /// `save_function`: the name of [`Table::save_function`], where it was
    /// installed (behind a transaction pooler), which the shared saves'
    /// text statements then call.
    pub(super) fn new(
        name: &TableName,
        layout: &Layout,
        lock_wait: std::time::Duration,
        save_function: Option<&str>,
    ) -> Self {
        let table = Table::new(name, layout, lock_wait);
        Self {
            load: arities().map(|k| table.load(k, true)).collect(),
            // Without an absolute timeout the cap (and its parameter) goes: the
            // statement that runs on every request stays as small as it can be.
            load_idle: arities().map(|k| table.load(k, false)).collect(),
            load_one: table.load_one(),
            load_one_text: table.load_one_text(),
            load_read: arities().map(|k| table.load_read(k)).collect(),
            load_read_text: arities().map(|k| table.load_read_text(k)).collect(),
            insert: table.insert(),
            insert_many: arities().map(|rows| table.insert_many(rows)).collect(),
            update: table.update(),
            update_many: arities().map(|rows| table.update_many(rows)).collect(),
            update_many_text: arities()
                .map(|rows| match save_function {
                    Some(function) => table.update_many_call(function, rows),
                    None => table.update_many_text(rows),
                })
                .collect(),
            select_for_update: table.select_for_update(),
            update_locked: table.update_locked(),
            delete: table.delete(),
            prune_batch: prune::batch_sql(&table),
            prune_tied: prune::tied_sql(&table),
            save_any: table.save_any(),
            extended: layout.extended,
        }
    }
}
type Args = sqlx::postgres::PgArguments;
/// A statement with its parameters bound.
pub(super) type Query<'q> = sqlx::query::Query<'q, sqlx::Postgres, Args>;
/// A statement answering one column, with its parameters bound.
pub(super) type Scalar<'q, O> = sqlx::query::QueryScalar<'q, sqlx::Postgres, O, Args>;

/// Each statement bound to its values, in the order its builder documents.
impl Sql {
    /// [`Table::load`] of `keys`, padded to the next arity; `None` for none.
    pub(super) fn load_query<'q>(&'q self, keys: &[&'q str], at: &LoadParams) -> Option<Query<'q>> {
        let (index, keys) = padded(keys)?;
        let statements = match at.absolute_secs {
            Some(_) => &self.load,
            None => &self.load_idle,
        };
        let mut q = sqlx::query(statements.get(index)?)
            .bind(at.extend_to)
            .bind(at.now)
            .bind(at.touch_before);
        if let Some(secs) = at.absolute_secs {
            q = q.bind(secs);
        }
        for key in keys {
            q = q.bind(*key);
        }
        Some(q)
    }

    /// [`Table::load_one`] with its values; in `text`, [`Table::load_one_text`].
    pub(super) fn load_one_stmt<'q>(
        &'q self,
        key: &'q str,
        now: OffsetDateTime,
        text: bool,
    ) -> Stmt<'q> {
        if text {
            Stmt::new(&self.load_one_text).text(key)
        } else {
            Stmt::new(&self.load_one).text(key).at(now)
        }
    }

    /// [`Table::load_read`] of `keys`, padded to the next arity; in `text`,
    /// [`Table::load_read_text`]. `None` for none.
    pub(super) fn load_read_stmt<'q>(
        &'q self,
        keys: &[&'q str],
        now: OffsetDateTime,
        text: bool,
    ) -> Option<Stmt<'q>> {
        let (index, keys) = padded(keys)?;
        let stmt = if text {
            Stmt::new(self.load_read_text.get(index)?)
        } else {
            Stmt::new(self.load_read.get(index)?).at(now)
        };
        Some(keys.fold(stmt, |stmt, key| stmt.text(key)))
    }

    /// [`Table::insert`].
    pub(super) fn insert_stmt<'q>(
        &'q self,
        key: &'q str,
        row: &NewRow<'q>,
        now: OffsetDateTime,
    ) -> Stmt<'q> {
        let stmt = Stmt::new(&self.insert)
            .text(key)
            .text(row.sess)
            .at(row.expire);
        if !self.extended {
            return stmt;
        }
        stmt.at(now)
            .opt(row.user_id)
            .opt(row.provider_sid)
            .opt(row.user_agent)
            .opt(row.ip)
    }

    /// [`Table::insert_many`] of `jobs`, padded to the next arity (the
    /// padding repeats the last row, which then finds its id taken by
    /// itself); `None` for none.
    pub(super) fn insert_many_stmt<'q>(&'q self, jobs: &[&'q InsertJob]) -> Option<Stmt<'q>> {
        let (index, padded) = padded(jobs)?;
        let mut stmt = Stmt::new(self.insert_many.get(index)?);
        for j in padded {
            let row = &j.row;
            stmt = stmt.text(&j.key).text(&row.sess).at(row.expire);
            if self.extended {
                stmt = stmt
                    .at(j.now)
                    .opt(row.user_id.as_deref())
                    .opt(row.provider_sid.as_deref())
                    .opt(j.user_agent.as_deref())
                    .opt(j.ip.as_deref());
            }
        }
        Some(stmt)
    }

    /// [`Table::update`].
    pub(super) fn update_stmt<'q>(
        &'q self,
        key: &'q str,
        new_key: &'q str,
        version: &'q str,
        row: &NewRow<'q>,
        now: OffsetDateTime,
    ) -> Stmt<'q> {
        let stmt = Stmt::new(&self.update)
            .text(key)
            .text(new_key)
            .text(row.sess)
            .at(row.expire)
            .text(version)
            .at(now);
        if !self.extended {
            return stmt;
        }
        stmt.opt(row.user_id).opt(row.provider_sid)
    }

    /// [`Table::update_many`] of `jobs`, padded to the next arity (the same
    /// row twice is written once); `None` for none.
    pub(super) fn update_many_stmt<'q>(
        &'q self,
        jobs: &[&'q UpdateJob],
        text: bool,
    ) -> Option<Stmt<'q>> {
        let first = jobs.first()?;
        let (index, padded) = padded(jobs)?;
        let statements = if text {
            &self.update_many_text
        } else {
            &self.update_many
        };
        let mut stmt = Stmt::new(statements.get(index)?).at(first.now);
        for j in padded {
            let row = &j.row;
            stmt = stmt
                .text(&j.key)
                .text(&row.sess)
                .at(row.expire)
                .text(&j.version);
            if self.extended {
                stmt = stmt
                    .opt(row.user_id.as_deref())
                    .opt(row.provider_sid.as_deref());
            }
        }
        Some(stmt)
    }

    /// [`Table::select_for_update`].
    pub(super) fn select_for_update_query<'q>(
        &'q self,
        key: &'q str,
        now: OffsetDateTime,
    ) -> Query<'q> {
        sqlx::query(&self.select_for_update).bind(key).bind(now)
    }

    /// [`Table::update_locked`].
    pub(super) fn update_locked_query<'q>(
        &'q self,
        key: &'q str,
        new_key: &'q str,
        row: &NewRow<'q>,
    ) -> Scalar<'q, String> {
        let q = sqlx::query_scalar(&self.update_locked)
            .bind(key)
            .bind(new_key)
            .bind(row.sess)
            .bind(row.expire);
        if !self.extended {
            return q;
        }
        q.bind(row.user_id).bind(row.provider_sid)
    }

    /// [`Table::delete`].
    pub(super) fn delete_query<'q>(&'q self, key: &'q str) -> Query<'q> {
        sqlx::query(&self.delete).bind(key)
    }
}

impl<'a> Table<'a> {
    pub(super) fn new(
        name: &TableName,
        layout: &'a Layout,
        lock_wait: std::time::Duration,
    ) -> Self {
        Self {
            t: name.qualified(),
            layout,
            bound: format!(
                "set_config('lock_timeout', '{}', true) IS NOT NULL",
                lock_wait.as_millis().clamp(1, i32::MAX as u128)
            ),
        }
    }

    /// `param` (a timestamptz) as the `expire` column's type.
    pub(super) fn to_col(&self, param: &str) -> String {
        to_col(&self.layout.expire, param)
    }

    /// The `expire` column's type, for casts.
    pub(super) fn column_type(&self) -> &'static str {
        match self.layout.expire {
            ExpireType::WithTimeZone => "timestamptz",
            ExpireType::WithoutTimeZone(_) => "timestamp",
        }
    }

    fn json(&self) -> &'static str {
        match self.layout.sess {
            SessType::Json => "json",
            SessType::Jsonb => "jsonb",
        }
    }

    fn ext_cols(&self) -> &'static str {
        if self.layout.extended {
            "created_at, user_id, provider_sid"
        } else {
            "NULL::timestamptz AS created_at, NULL::text AS user_id, NULL::text AS provider_sid"
        }
    }

    /// Loads `keys` rows. Parameters: $1 extend to, $2 now, $3 touch rows
    /// expiring before, [$4 absolute timeout in seconds], then the keys.
    ///
    /// The rows are found once by primary key. Only those due are locked
    /// and updated, and a row locked elsewhere (a write or a token refresh
    /// in progress) is skipped rather than waited for: a load never waits on
    /// a row lock, and loads sharing a statement never wait on each other.
    /// The UPDATE returns the latest version of a row it touches.
    fn load(&self, keys: usize, absolute: bool) -> String {
        let (t, layout) = (&self.t, self.layout);
        let ext_cols = self.ext_cols();
        // The touch also records when the session was last seen (to the
        // touch's granularity: no extra writes for it).
        let touch_extra = if layout.extended {
            ", last_seen = $2"
        } else {
            ""
        };
        let first = if absolute { 5 } else { 4 };
        let list = placeholders(first, keys);
        let extend = |of: &str| {
            if absolute {
                self.to_col(&format!(
                    "LEAST($1, {of}created_at + $4 * interval '1 second')"
                ))
            } else {
                self.to_col("$1")
            }
        };
        let now = self.to_col("$2");
        let before = self.to_col("$3");
        let from_cur = to_instant(&layout.expire, "expire");
        let from_t = to_instant(&layout.expire, "t.expire");
        let t_ext = if layout.extended {
            "t.created_at, t.user_id, t.provider_sid"
        } else {
            ext_cols
        };
        // The table is reached by primary key, then by physical row id
        // (TID scans), and the times are compared only on the
        // materialized rows: no plan can choose the expire index, and no
        // estimate depends on the time parameters, so Postgres keeps one
        // generic plan instead of planning each execution. A row locked
        // by `due` is the version `cur` read (a newer one has another
        // row id and fails the TID check), so the checks made on `cur`
        // hold for it.
        let rows = by_key(
            t,
            &format!("ctid AS row_id, sid, sess, expire, xmin, {ext_cols}"),
            &text_array(&list),
        );
        format!(
            "WITH cur AS MATERIALIZED ({rows}), \
             due AS (\
               SELECT ctid AS row_id FROM {t} \
               WHERE ctid = ANY(ARRAY(SELECT row_id FROM cur \
                 WHERE expire > {now} AND expire < {before} AND expire < {extend_cur})) \
               FOR UPDATE SKIP LOCKED), \
             touched AS (\
               UPDATE {t} AS t SET expire = {extend_t}{touch_extra} \
               WHERE ctid = ANY(ARRAY(SELECT row_id FROM due)) \
               RETURNING t.sess::text AS sess, {from_t} AS expire, t.xmin::text AS version, \
               {t_ext}, t.sid) \
             SELECT sess, expire, version, created_at, user_id, provider_sid, true, sid::text \
             FROM touched \
             UNION ALL \
             SELECT sess::text, {from_cur}, xmin::text, created_at, user_id, provider_sid, \
             false, sid::text FROM cur \
             WHERE expire > {now} \
             AND NOT EXISTS (SELECT 1 FROM touched WHERE touched.sid = cur.sid)",
            extend_cur = extend(""),
            extend_t = extend("t."),
        )
    }

    /// Loads one live row by primary key, without touching it: the
    /// statement of a load that has nobody to share with. Parameters: $1
    /// key, $2 now. Answers the columns of [`Table::load`] (`touched`
    /// false), so the caller can tell whether the touch is due and leave it
    /// to that statement: due once per share of the idle timeout, not on
    /// every read.
    fn load_one(&self) -> String {
        format!(
            "SELECT sess::text, {}, xmin::text, {}, false, sid::text FROM {} \
             WHERE sid = $1 AND expire > {}",
            to_instant(&self.layout.expire, "expire"),
            self.ext_cols(),
            self.t,
            self.to_col("$2")
        )
    }

    /// The columns of [`Table::load`] but the key, for the simple query
    /// protocol, from rows with the table's columns. Results come as text,
    /// so instants are seconds since the epoch (`extract` answers a decimal
    /// with six places): no date style or time zone setting of the server
    /// connection can change how they read.
    fn text_cols(&self) -> String {
        let epoch = |column: &str| format!("extract(epoch FROM {column})");
        let ext = if self.layout.extended {
            format!("{}, user_id, provider_sid", epoch("created_at"))
        } else {
            "NULL, NULL, NULL".to_owned()
        };
        format!(
            "sess::text, {}, xmin::text, {ext}, false",
            epoch(&to_instant(&self.layout.expire, "expire"))
        )
    }

    /// [`Self::load_one`] for the simple query protocol, which Postgres
    /// plans at each run. Parameters: $1 key. The caller drops an expired
    /// row: a time compared in the statement would have the planner probe
    /// the `expire` index for its bounds at each run, costing more than
    /// the rest of the statement.
    fn load_one_text(&self) -> String {
        format!("SELECT {} FROM {} WHERE sid = $1", self.text_cols(), self.t)
    }

    /// [`Self::load_read`] for the simple query protocol; the keys.
    /// Planned anew at each run, with the keys in view: a plain `= ANY`
    /// gets the primary-key index scan, and plans faster than the shape a
    /// generic plan needs ([`by_key`]). As [`Self::load_one_text`], the
    /// caller drops expired rows.
    fn load_read_text(&self, keys: usize) -> String {
        let list = placeholders(1, keys);
        format!(
            "SELECT {}, sid::text FROM {} WHERE sid = ANY(ARRAY[{list}]::text[])",
            self.text_cols(),
            self.t,
        )
    }

    /// Loads `keys` live rows, read only: the shared statement while no row
    /// is due for its idle extension. Parameters: $1 now, then the keys.
    /// Answers the columns of [`Table::load`] (`touched` false); the caller
    /// hands the rows due to that statement.
    fn load_read(&self, keys: usize) -> String {
        let list = placeholders(2, keys);
        let rows = by_key(
            &self.t,
            &format!("sid, sess, expire, xmin, {}", self.ext_cols()),
            &text_array(&list),
        );
        format!(
            "SELECT sess::text, {}, xmin::text, created_at, user_id, provider_sid, false, \
             sid::text FROM ({rows}) AS cur WHERE expire > {}",
            to_instant(&self.layout.expire, "expire"),
            self.to_col("$1")
        )
    }

    /// Creates `rows` rows, each unless its id is taken; answers the id and
    /// version of each created. Parameters per row, as for
    /// [`Table::insert`] ($1 … $3 or $1 … $8 for the first row, then on).
    fn insert_many(&self, rows: usize) -> String {
        let per = if self.layout.extended { 8 } else { 3 };
        let values = (0..rows)
            .map(|r| {
                let p = |i: usize| format!("${}", 1 + r * per + i);
                let ext = if self.layout.extended {
                    let now = p(3);
                    format!(", {now}, {now}, {}, {}, {}, {}", p(4), p(5), p(6), p(7))
                } else {
                    String::new()
                };
                format!(
                    "({}, {}::{}, {}{ext})",
                    p(0),
                    p(1),
                    self.json(),
                    self.to_col(&p(2))
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let cols = if self.layout.extended {
            ", created_at, last_seen, user_id, provider_sid, user_agent, ip"
        } else {
            ""
        };
        format!(
            "INSERT INTO {} (sid, sess, expire{cols}) VALUES {values} \
             ON CONFLICT (sid) DO NOTHING RETURNING sid::text, xmin::text",
            self.t
        )
    }

    /// Creates a row unless the id is taken. Parameters: $1 key, $2 sess,
    /// $3 expire[, $4 now (`created_at`, `last_seen`), $5 `user_id`,
    /// $6 `provider_sid`, $7 `user_agent`, $8 ip].
    fn insert(&self) -> String {
        let (cols, vals) = if self.layout.extended {
            (
                ", created_at, last_seen, user_id, provider_sid, user_agent, ip",
                ", $4, $4, $5, $6, $7, $8",
            )
        } else {
            ("", "")
        };
        format!(
            "INSERT INTO {t} (sid, sess, expire{cols}) \
             VALUES ($1, $2::{json}, {expire}{vals}) \
             ON CONFLICT (sid) DO NOTHING RETURNING xmin::text",
            t = self.t,
            json = self.json(),
            expire = self.to_col("$3"),
        )
    }

    /// Writes a live row still at the version loaded, possibly under a new
    /// key. Parameters: $1 key, $2 new key, $3 sess, $4 expire, $5 version,
    /// $6 now[, $7 `user_id`, $8 `provider_sid`].
    fn update(&self) -> String {
        let set_ext = if self.layout.extended {
            ", user_id = $7, provider_sid = $8, last_seen = $6"
        } else {
            ""
        };
        format!(
            "UPDATE {t} SET sid = $2, sess = $3::{json}, expire = {expire}{set_ext} \
             WHERE sid = $1 AND xmin = $5::xid AND expire > {now} AND {bound} \
             RETURNING xmin::text",
            bound = self.bound,
            t = self.t,
            json = self.json(),
            expire = self.to_col("$4"),
            now = self.to_col("$6"),
        )
    }

    /// Writes `rows` rows, each only if it is still at the version its
    /// request loaded and no one else holds it. Parameters: $1 now, then per
    /// row: key, sess, expire, version[, `user_id`, `provider_sid`].
    fn update_many(&self, rows: usize) -> String {
        let per = self.per_row();
        let (values, v_ext) = self.update_values(rows, per);
        let keys = text_array(&row_column(rows, per, 0));
        self.shared_update(
            &format!("(sid, sess, expire, version{v_ext}) AS (VALUES {values})"),
            &keys,
            "$1",
        )
    }

    /// The shared save's statement: the rows of `v` (the CTE's columns and
    /// body) found by primary key (`keys`, a `text[]`), then by physical row
    /// id, as loads are, whatever the planner thinks of the table's size or
    /// the time; each written only if it is live at `now` (a timestamptz),
    /// still at the version its request loaded and held by no one else.
    fn shared_update(&self, v: &str, keys: &str, now: &str) -> String {
        let t = &self.t;
        let rows = by_key(t, "ctid AS row_id, expire", keys);
        format!(
            "WITH v {v}, \
             cur AS MATERIALIZED ({rows}), \
             free AS (\
               SELECT ctid AS row_id, sid, xmin FROM {t} \
               WHERE ctid = ANY(ARRAY(SELECT row_id FROM cur WHERE expire > {now_col})) \
               FOR UPDATE SKIP LOCKED) \
             UPDATE {t} AS t SET sess = v.sess::{json}, expire = {expire}{set_ext} \
             FROM v JOIN free ON free.sid = v.sid AND free.xmin = v.version \
             WHERE t.ctid = ANY(ARRAY(SELECT row_id FROM free)) AND t.ctid = free.row_id \
             RETURNING v.sid::text, t.xmin::text",
            json = self.json(),
            now_col = self.to_col(now),
            expire = self.to_col("v.expire"),
            set_ext = self.set_ext(now),
        )
    }

    /// The optional columns a shared save writes, `now` the instant.
    fn set_ext(&self, now: &str) -> String {
        if self.layout.extended {
            format!(", user_id = v.user_id, provider_sid = v.provider_sid, last_seen = {now}")
        } else {
            String::new()
        }
    }

    /// The parameters of each row of a shared update: key, sess, expire,
    /// version[, `user_id`, `provider_sid`].
    fn per_row(&self) -> usize {
        if self.layout.extended {
            6
        } else {
            4
        }
    }

    /// The `VALUES` rows of the shared updates, `per` parameters each after
    /// $1; with the names of the optional columns.
    fn update_values(&self, rows: usize, per: usize) -> (String, &'static str) {
        let layout = self.layout;
        let values = (0..rows)
            .map(|r| {
                let p = |i: usize| format!("${}", 2 + r * per + i);
                let ext = if layout.extended {
                    format!(", {}::text, {}::text", p(4), p(5))
                } else {
                    String::new()
                };
                format!(
                    "({}::text, {}::text, {}::timestamptz, {}::xid{ext})",
                    p(0),
                    p(1),
                    p(2),
                    p(3)
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let v_ext = if layout.extended {
            ", user_id, provider_sid"
        } else {
            ""
        };
        (values, v_ext)
    }

    /// [`Self::update_many`] for the simple query protocol, which Postgres
    /// plans at each run: the rows found by `= ANY` with the keys in view,
    /// and the time compared only on the locked rows (compared in the scan,
    /// it would have the planner probe the `expire` index for its bounds).
    /// A row changed since its request loaded it is locked at its latest
    /// version, whose `xmin` then fails the version check. Parameters as
    /// for [`Self::update_many`].
    fn update_many_text(&self, rows: usize) -> String {
        let t = &self.t;
        let per = self.per_row();
        let (values, v_ext) = self.update_values(rows, per);
        let set_ext = self.set_ext("$1");
        let keys = row_column(rows, per, 0);
        format!(
            "WITH v (sid, sess, expire, version{v_ext}) AS (VALUES {values}), \
             free AS (\
               SELECT ctid AS row_id, sid, xmin, expire FROM {t} \
               WHERE sid = ANY(ARRAY[{keys}]::text[]) FOR UPDATE SKIP LOCKED) \
             UPDATE {t} AS t SET sess = v.sess::{json}, expire = {expire}{set_ext} \
             FROM v JOIN free ON free.sid = v.sid AND free.xmin = v.version \
             WHERE t.ctid = ANY(ARRAY(SELECT row_id FROM free)) AND t.ctid = free.row_id \
             AND free.expire > {now} \
             RETURNING v.sid::text, t.xmin::text",
            json = self.json(),
            now = self.to_col("$1"),
            expire = self.to_col("v.expire"),
        )
    }

    /// The function that runs [`Self::update_many`]'s statement with the
    /// rows as arrays, any number of them: the shared saves call it behind a
    /// transaction pooler, where every query is parsed and planned at each
    /// run. A function's statement is planned once per server connection,
    /// which the pooler cannot undo, and its generic plan is kept (the
    /// statement finds rows by key alone, whatever the table's size). Its
    /// name ends in a digest of its definition, so that instances running
    /// two versions of this crate each call their own. Its search path is
    /// pinned: only the table is named outside `pg_catalog`, qualified; its
    /// columns win over the function's names. Parameters of the call as for
    /// [`Self::update_many`].
    pub(super) fn save_function(&self, name: &TableName) -> Function {
        let (params, arrays, v_ext) = if self.layout.extended {
            (
                ", p_user_id text[], p_provider_sid text[]",
                ", p_user_id, p_provider_sid",
                ", user_id, provider_sid",
            )
        } else {
            ("", "", "")
        };
        let v = format!(
            "AS (SELECT * FROM unnest(p_sid, p_sess, p_expire, p_version{arrays}) \
             AS v (sid, sess, expire, version{v_ext}))"
        );
        let definition = format!(
            "(p_now timestamptz, p_sid text[], p_sess text[], p_expire timestamptz[], \
             p_version xid[]{params}) RETURNS TABLE (sid text, version text) \
             LANGUAGE plpgsql VOLATILE \
             SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan \
             AS $fn$ #variable_conflict use_column\nBEGIN RETURN QUERY {query}; END $fn$",
            query = self.shared_update(&v, "p_sid", "p_now"),
        );
        let function = name.function("save", &definition);
        Function {
            ddl: format!("CREATE FUNCTION {function}{definition}"),
            name: function,
        }
    }

    /// A call of [`Self::save_function`] (named `function`) with `rows`
    /// rows; parameters as for [`Self::update_many`].
    fn update_many_call(&self, function: &str, rows: usize) -> String {
        let per = self.per_row();
        let types = ["text", "text", "timestamptz", "xid", "text", "text"];
        let arrays: String = types[..per]
            .iter()
            .enumerate()
            .map(|(i, ty)| format!(", ARRAY[{}]::{ty}[]", row_column(rows, per, i)))
            .collect();
        format!("SELECT sid, version FROM {function}($1{arrays})")
    }

    /// Reads and locks a live row. Parameters: $1 key, $2 now.
    fn select_for_update(&self) -> String {
        format!(
            "SELECT sess::text, {from_col}, xmin::text, {ext_cols}, false FROM {t} \
             WHERE sid = $1 AND expire > {now} AND {bound} FOR UPDATE",
            bound = self.bound,
            from_col = to_instant(&self.layout.expire, "expire"),
            ext_cols = self.ext_cols(),
            t = self.t,
            now = self.to_col("$2"),
        )
    }

    /// Writes a row this transaction has locked. Parameters: $1 key, $2 new
    /// key, $3 sess, $4 expire[, $5 `user_id`, $6 `provider_sid`].
    fn update_locked(&self) -> String {
        let set_ext = if self.layout.extended {
            ", user_id = $5, provider_sid = $6"
        } else {
            ""
        };
        format!(
            "UPDATE {t} SET sid = $2, sess = $3::{json}, expire = {expire}{set_ext} \
             WHERE sid = $1 RETURNING xmin::text",
            t = self.t,
            json = self.json(),
            expire = self.to_col("$4"),
        )
    }

    /// Deletes a row. Parameters: $1 key.
    fn delete(&self) -> String {
        format!(
            "DELETE FROM {t} WHERE sid = $1 AND {bound}",
            bound = self.bound,
            t = self.t,
        )
    }

    /// Writes a row whatever its version. Parameters: $1 key, $2 sess,
    /// $3 expire.
    fn save_any(&self) -> String {
        format!(
            "UPDATE {t} SET sess = $2::{json}, expire = {expire} WHERE sid = $1",
            t = self.t,
            json = self.json(),
            expire = self.to_col("$3"),
        )
    }
}

/// The `i`-th parameter of each of `rows` rows of `per` parameters after
/// $1 (`i` 0: the keys).
fn row_column(rows: usize, per: usize, i: usize) -> String {
    (0..rows)
        .map(|r| format!("${}", 2 + r * per + i))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `items` as a `text[]`.
fn text_array(items: &str) -> String {
    format!("ARRAY[{items}]::text[]")
}

/// `$first, …` for `count` parameters.
fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The rows of `t` whose `sid` is one of `keys` (a `text[]`, repeats
/// allowed), `columns` of each: one primary-key lookup per distinct
/// key. Unlike `sid IN (…)`, which Postgres answers with a sequential scan
/// once the list is long and the table small, this plan never depends on
/// the table's size.
fn by_key(t: &str, columns: &str, keys: &str) -> String {
    format!(
        "SELECT r.* FROM (SELECT DISTINCT k FROM unnest({keys}) AS k) AS keys \
         CROSS JOIN LATERAL (SELECT {columns} FROM {t} WHERE sid = keys.k LIMIT 1) AS r"
    )
}

/// The arities shared statements are prepared for: 1, 2, 4, …
/// [`batch::MAX_KEYS`]. One statement per power of two keeps few prepared
/// statements, each with one generic plan (an array parameter would make
/// Postgres plan every execution anew).
pub(super) fn arities() -> impl Iterator<Item = usize> {
    (0..=batch::MAX_KEYS.trailing_zeros()).map(|p| 1 << p)
}

/// Instants travel as timestamptz; a `timestamp` column holds wall-clock time
/// in the zone Node writes it in, so values are converted on the way in…
/// One value of a statement.
#[derive(Debug, Clone, Copy)]
enum Arg<'q> {
    Text(Option<&'q str>),
    At(OffsetDateTime),
}

impl Arg<'_> {
    /// The value as SQL text; `None` for a NUL byte.
    fn literal(self) -> Option<String> {
        match self {
            Self::Text(None) => Some("NULL".to_owned()),
            Self::Text(Some(text)) => literal(text),
            Self::At(at) => Some(instant_literal(at)),
        }
    }
}

/// A statement with its values, for either protocol: prepared with the
/// values bound, or as one simple-protocol query with the values written
/// in as literals (behind a transaction pooler: one round trip, which
/// needs no transaction to stay on one server connection).
#[derive(Debug)]
pub(super) struct Stmt<'q> {
    sql: &'q str,
    args: Vec<Arg<'q>>,
}

impl<'q> Stmt<'q> {
    fn new(sql: &'q str) -> Self {
        Self {
            sql,
            args: Vec::new(),
        }
    }

    fn text(mut self, value: &'q str) -> Self {
        self.args.push(Arg::Text(Some(value)));
        self
    }

    fn opt(mut self, value: Option<&'q str>) -> Self {
        self.args.push(Arg::Text(value));
        self
    }

    fn at(mut self, at: OffsetDateTime) -> Self {
        self.args.push(Arg::At(at));
        self
    }

    /// The prepared statement with its values bound ($1 the first).
    pub(super) fn prepared(self) -> Query<'q> {
        self.args
            .into_iter()
            .fold(sqlx::query(self.sql), |q, arg| match arg {
                Arg::Text(text) => q.bind(text),
                Arg::At(at) => q.bind(at),
            })
    }

    /// The query text with each `$n` replaced by the literal of the n-th
    /// value; `None` when a value holds a NUL byte. Only the statements of
    /// this module go through here: no `$` is ever inside their quotes, and
    /// none is skipped in the text around them.
    pub(super) fn inlined(&self) -> Option<String> {
        let mut out = String::with_capacity(self.sql.len() + 32 * self.args.len());
        let mut rest = self.sql;
        let mut quoted = false;
        while let Some(at) = rest.find(['$', '\'']) {
            let (before, from) = rest.split_at(at);
            out.push_str(before);
            if let Some(after) = from.strip_prefix('\'') {
                quoted = !quoted;
                out.push('\'');
                rest = after;
                continue;
            }
            let after = &from[1..];
            let digits = after.bytes().take_while(u8::is_ascii_digit).count();
            if quoted || digits == 0 {
                out.push('$');
                rest = after;
                continue;
            }
            let (n, tail) = after.split_at(digits);
            let n: usize = n.parse().ok()?;
            out.push_str(&self.args.get(n.checked_sub(1)?)?.literal()?);
            rest = tail;
        }
        out.push_str(rest);
        Some(out)
    }
}

/// The instant `text` names in seconds since the epoch, as `extract(epoch
/// …)` answers it: a decimal with up to six places (numeric), or more when
/// the server answers a float (before Postgres 14), rounded to the
/// microsecond.
pub(super) fn epoch_seconds(text: &str) -> Option<OffsetDateTime> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !all_digits(whole) || !all_digits(fraction) {
        return None;
    }
    let mut micros: i128 = whole.parse::<i128>().ok()?.checked_mul(1_000_000)?;
    let mut scale = 100_000;
    for digit in fraction.bytes().map(|b| i128::from(b - b'0')) {
        if scale == 0 {
            micros += i128::from(digit >= 5);
            break;
        }
        micros += digit * scale;
        scale /= 10;
    }
    let micros = if negative { -micros } else { micros };
    OffsetDateTime::from_unix_timestamp_nanos(micros.checked_mul(1000)?).ok()
}

/// `value` as an escape string literal: read the same whatever
/// `standard_conforming_strings` says. `None` for a NUL byte, which no
/// Postgres text holds.
pub(super) fn literal(value: &str) -> Option<String> {
    if value.contains('\0') {
        return None;
    }
    Some(format!(
        "E'{}'",
        value.replace('\\', "\\\\").replace('\'', "\\'")
    ))
}

/// An instant as a `timestamptz` literal (RFC 3339 in UTC: digits,
/// dashes, colons, a dot, `T` and `Z` only).
fn instant_literal(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "'{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z'::timestamptz",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.microsecond()
    )
}

pub(super) fn to_col(expire: &ExpireType, param: &str) -> String {
    match expire {
        ExpireType::WithTimeZone => param.to_owned(),
        ExpireType::WithoutTimeZone(zone) => format!("({param} AT TIME ZONE '{zone}')"),
    }
}

/// …and on the way out.
pub(super) fn to_instant(expire: &ExpireType, column: &str) -> String {
    match expire {
        ExpireType::WithTimeZone => column.to_owned(),
        ExpireType::WithoutTimeZone(zone) => format!("({column} AT TIME ZONE '{zone}')"),
    }
}

#[cfg(test)]
mod tests {
    //! The text of every statement, per table layout: a change to the SQL
    //! shows here first. (Loads and shared updates are pinned at their two
    //! smallest arities.)

    use super::*;
    use crate::store::schema::Ident;

    fn sql(schema: Option<&str>, table: &str, layout: Layout) -> Sql {
        let ident = |s: &str| Ident::new(s).unwrap_or_else(|_| unreachable!());
        let name = TableName {
            schema: schema.map(ident),
            table: ident(table),
        };
        Sql::new(&name, &layout, std::time::Duration::from_millis(5000), None)
    }

    /// connect-pg-simple's own table: `json`, `timestamp` (read in UTC), no extra columns.
    #[test]
    fn a_connect_pg_simple_table() {
        let sql = sql(
            None,
            "session",
            Layout {
                sess: SessType::Json,
                expire: ExpireType::WithoutTimeZone("UTC".into()),
                extended: false,
            },
        );
        assert_eq!(
            sql.insert,
            "INSERT INTO \"session\" (sid, sess, expire) VALUES ($1, $2::json, ($3 AT TIME ZONE 'UTC')) ON CONFLICT (sid) DO NOTHING RETURNING xmin::text"
        );
        assert_eq!(
            sql.update,
            "UPDATE \"session\" SET sid = $2, sess = $3::json, expire = ($4 AT TIME ZONE 'UTC') WHERE sid = $1 AND xmin = $5::xid AND expire > ($6 AT TIME ZONE 'UTC') AND set_config('lock_timeout', '5000', true) IS NOT NULL RETURNING xmin::text"
        );
        assert_eq!(
            sql.select_for_update,
            "SELECT sess::text, (expire AT TIME ZONE 'UTC'), xmin::text, NULL::timestamptz AS created_at, NULL::text AS user_id, NULL::text AS provider_sid, false FROM \"session\" WHERE sid = $1 AND expire > ($2 AT TIME ZONE 'UTC') AND set_config('lock_timeout', '5000', true) IS NOT NULL FOR UPDATE"
        );
        assert_eq!(
            sql.update_locked,
            "UPDATE \"session\" SET sid = $2, sess = $3::json, expire = ($4 AT TIME ZONE 'UTC') WHERE sid = $1 RETURNING xmin::text"
        );
        assert_eq!(
            sql.delete,
            "DELETE FROM \"session\" WHERE sid = $1 AND set_config('lock_timeout', '5000', true) IS NOT NULL"
        );
        assert_eq!(
            sql.save_any,
            "UPDATE \"session\" SET sess = $2::json, expire = ($3 AT TIME ZONE 'UTC') WHERE sid = $1"
        );
        assert_eq!(
            sql.prune_batch,
            "WITH no_sync AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)), next AS MATERIALIZED (SELECT expire FROM \"session\" WHERE expire >= $3::timestamp AND expire < ($1 AT TIME ZONE 'UTC') AND EXISTS (SELECT FROM no_sync) ORDER BY expire OFFSET $2 LIMIT 1), gone AS (DELETE FROM \"session\" WHERE expire >= $3::timestamp AND expire < coalesce((SELECT expire FROM next), ($1 AT TIME ZONE 'UTC')) RETURNING 1) SELECT (SELECT count(*) FROM gone), (SELECT expire::text FROM next)"
        );
        assert_eq!(
            sql.prune_tied,
            "WITH no_sync AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)), gone AS (DELETE FROM \"session\" WHERE ctid = ANY(ARRAY(SELECT ctid FROM \"session\" WHERE expire = $3::timestamp AND expire < ($1 AT TIME ZONE 'UTC') AND EXISTS (SELECT FROM no_sync) LIMIT $2)) AND expire = $3::timestamp AND expire < ($1 AT TIME ZONE 'UTC') RETURNING 1) SELECT count(*) FROM gone"
        );
        assert_eq!(
            sql.load[0],
            "WITH cur AS MATERIALIZED (SELECT r.* FROM (SELECT DISTINCT k FROM unnest(ARRAY[$5]::text[]) AS k) AS keys CROSS JOIN LATERAL (SELECT ctid AS row_id, sid, sess, expire, xmin, NULL::timestamptz AS created_at, NULL::text AS user_id, NULL::text AS provider_sid FROM \"session\" WHERE sid = keys.k LIMIT 1) AS r), due AS (SELECT ctid AS row_id FROM \"session\" WHERE ctid = ANY(ARRAY(SELECT row_id FROM cur WHERE expire > ($2 AT TIME ZONE 'UTC') AND expire < ($3 AT TIME ZONE 'UTC') AND expire < (LEAST($1, created_at + $4 * interval '1 second') AT TIME ZONE 'UTC'))) FOR UPDATE SKIP LOCKED), touched AS (UPDATE \"session\" AS t SET expire = (LEAST($1, t.created_at + $4 * interval '1 second') AT TIME ZONE 'UTC') WHERE ctid = ANY(ARRAY(SELECT row_id FROM due)) RETURNING t.sess::text AS sess, (t.expire AT TIME ZONE 'UTC') AS expire, t.xmin::text AS version, NULL::timestamptz AS created_at, NULL::text AS user_id, NULL::text AS provider_sid, t.sid) SELECT sess, expire, version, created_at, user_id, provider_sid, true, sid::text FROM touched UNION ALL SELECT sess::text, (expire AT TIME ZONE 'UTC'), xmin::text, created_at, user_id, provider_sid, false, sid::text FROM cur WHERE expire > ($2 AT TIME ZONE 'UTC') AND NOT EXISTS (SELECT 1 FROM touched WHERE touched.sid = cur.sid)"
        );
        assert_eq!(
            sql.insert_many[1],
            "INSERT INTO \"session\" (sid, sess, expire) VALUES ($1, $2::json, ($3 AT TIME ZONE 'UTC')), ($4, $5::json, ($6 AT TIME ZONE 'UTC')) ON CONFLICT (sid) DO NOTHING RETURNING sid::text, xmin::text"
        );
        assert_eq!(
            sql.load_read[1],
            "SELECT sess::text, (expire AT TIME ZONE 'UTC'), xmin::text, created_at, user_id, provider_sid, false, sid::text FROM (SELECT r.* FROM (SELECT DISTINCT k FROM unnest(ARRAY[$2, $3]::text[]) AS k) AS keys CROSS JOIN LATERAL (SELECT sid, sess, expire, xmin, NULL::timestamptz AS created_at, NULL::text AS user_id, NULL::text AS provider_sid FROM \"session\" WHERE sid = keys.k LIMIT 1) AS r) AS cur WHERE expire > ($1 AT TIME ZONE 'UTC')"
        );
        assert_eq!(
            sql.load_one,
            "SELECT sess::text, (expire AT TIME ZONE 'UTC'), xmin::text, NULL::timestamptz AS created_at, NULL::text AS user_id, NULL::text AS provider_sid, false, sid::text FROM \"session\" WHERE sid = $1 AND expire > ($2 AT TIME ZONE 'UTC')"
        );
        assert_eq!(
            sql.load_idle[1],
            "WITH cur AS MATERIALIZED (SELECT r.* FROM (SELECT DISTINCT k FROM unnest(ARRAY[$4, $5]::text[]) AS k) AS keys CROSS JOIN LATERAL (SELECT ctid AS row_id, sid, sess, expire, xmin, NULL::timestamptz AS created_at, NULL::text AS user_id, NULL::text AS provider_sid FROM \"session\" WHERE sid = keys.k LIMIT 1) AS r), due AS (SELECT ctid AS row_id FROM \"session\" WHERE ctid = ANY(ARRAY(SELECT row_id FROM cur WHERE expire > ($2 AT TIME ZONE 'UTC') AND expire < ($3 AT TIME ZONE 'UTC') AND expire < ($1 AT TIME ZONE 'UTC'))) FOR UPDATE SKIP LOCKED), touched AS (UPDATE \"session\" AS t SET expire = ($1 AT TIME ZONE 'UTC') WHERE ctid = ANY(ARRAY(SELECT row_id FROM due)) RETURNING t.sess::text AS sess, (t.expire AT TIME ZONE 'UTC') AS expire, t.xmin::text AS version, NULL::timestamptz AS created_at, NULL::text AS user_id, NULL::text AS provider_sid, t.sid) SELECT sess, expire, version, created_at, user_id, provider_sid, true, sid::text FROM touched UNION ALL SELECT sess::text, (expire AT TIME ZONE 'UTC'), xmin::text, created_at, user_id, provider_sid, false, sid::text FROM cur WHERE expire > ($2 AT TIME ZONE 'UTC') AND NOT EXISTS (SELECT 1 FROM touched WHERE touched.sid = cur.sid)"
        );
        assert_eq!(
            sql.update_many[0],
            "WITH v (sid, sess, expire, version) AS (VALUES ($2::text, $3::text, $4::timestamptz, $5::xid)), cur AS MATERIALIZED (SELECT r.* FROM (SELECT DISTINCT k FROM unnest(ARRAY[$2]::text[]) AS k) AS keys CROSS JOIN LATERAL (SELECT ctid AS row_id, expire FROM \"session\" WHERE sid = keys.k LIMIT 1) AS r), free AS (SELECT ctid AS row_id, sid, xmin FROM \"session\" WHERE ctid = ANY(ARRAY(SELECT row_id FROM cur WHERE expire > ($1 AT TIME ZONE 'UTC'))) FOR UPDATE SKIP LOCKED) UPDATE \"session\" AS t SET sess = v.sess::json, expire = (v.expire AT TIME ZONE 'UTC') FROM v JOIN free ON free.sid = v.sid AND free.xmin = v.version WHERE t.ctid = ANY(ARRAY(SELECT row_id FROM free)) AND t.ctid = free.row_id RETURNING v.sid::text, t.xmin::text"
        );
        assert_eq!(
            sql.update_many[1],
            "WITH v (sid, sess, expire, version) AS (VALUES ($2::text, $3::text, $4::timestamptz, $5::xid), ($6::text, $7::text, $8::timestamptz, $9::xid)), cur AS MATERIALIZED (SELECT r.* FROM (SELECT DISTINCT k FROM unnest(ARRAY[$2, $6]::text[]) AS k) AS keys CROSS JOIN LATERAL (SELECT ctid AS row_id, expire FROM \"session\" WHERE sid = keys.k LIMIT 1) AS r), free AS (SELECT ctid AS row_id, sid, xmin FROM \"session\" WHERE ctid = ANY(ARRAY(SELECT row_id FROM cur WHERE expire > ($1 AT TIME ZONE 'UTC'))) FOR UPDATE SKIP LOCKED) UPDATE \"session\" AS t SET sess = v.sess::json, expire = (v.expire AT TIME ZONE 'UTC') FROM v JOIN free ON free.sid = v.sid AND free.xmin = v.version WHERE t.ctid = ANY(ARRAY(SELECT row_id FROM free)) AND t.ctid = free.row_id RETURNING v.sid::text, t.xmin::text"
        );
    }

    /// The table this crate creates: `json`, `timestamptz`, the extra columns.
    #[test]
    fn a_table_with_the_extended_columns() {
        let sql = sql(
            None,
            "session",
            Layout {
                sess: SessType::Json,
                expire: ExpireType::WithTimeZone,
                extended: true,
            },
        );
        assert_eq!(
            sql.insert,
            "INSERT INTO \"session\" (sid, sess, expire, created_at, last_seen, user_id, provider_sid, user_agent, ip) VALUES ($1, $2::json, $3, $4, $4, $5, $6, $7, $8) ON CONFLICT (sid) DO NOTHING RETURNING xmin::text"
        );
        assert_eq!(
            sql.update,
            "UPDATE \"session\" SET sid = $2, sess = $3::json, expire = $4, user_id = $7, provider_sid = $8, last_seen = $6 WHERE sid = $1 AND xmin = $5::xid AND expire > $6 AND set_config('lock_timeout', '5000', true) IS NOT NULL RETURNING xmin::text"
        );
        assert_eq!(
            sql.select_for_update,
            "SELECT sess::text, expire, xmin::text, created_at, user_id, provider_sid, false FROM \"session\" WHERE sid = $1 AND expire > $2 AND set_config('lock_timeout', '5000', true) IS NOT NULL FOR UPDATE"
        );
        assert_eq!(
            sql.update_locked,
            "UPDATE \"session\" SET sid = $2, sess = $3::json, expire = $4, user_id = $5, provider_sid = $6 WHERE sid = $1 RETURNING xmin::text"
        );
        assert_eq!(
            sql.delete,
            "DELETE FROM \"session\" WHERE sid = $1 AND set_config('lock_timeout', '5000', true) IS NOT NULL"
        );
        assert_eq!(
            sql.save_any,
            "UPDATE \"session\" SET sess = $2::json, expire = $3 WHERE sid = $1"
        );
        assert_eq!(
            sql.prune_batch,
            "WITH no_sync AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)), next AS MATERIALIZED (SELECT expire FROM \"session\" WHERE expire >= $3::timestamptz AND expire < $1 AND EXISTS (SELECT FROM no_sync) ORDER BY expire OFFSET $2 LIMIT 1), gone AS (DELETE FROM \"session\" WHERE expire >= $3::timestamptz AND expire < coalesce((SELECT expire FROM next), $1) RETURNING 1) SELECT (SELECT count(*) FROM gone), (SELECT expire::text FROM next)"
        );
        assert_eq!(
            sql.prune_tied,
            "WITH no_sync AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)), gone AS (DELETE FROM \"session\" WHERE ctid = ANY(ARRAY(SELECT ctid FROM \"session\" WHERE expire = $3::timestamptz AND expire < $1 AND EXISTS (SELECT FROM no_sync) LIMIT $2)) AND expire = $3::timestamptz AND expire < $1 RETURNING 1) SELECT count(*) FROM gone"
        );
        assert_eq!(
            sql.load[0],
            "WITH cur AS MATERIALIZED (SELECT r.* FROM (SELECT DISTINCT k FROM unnest(ARRAY[$5]::text[]) AS k) AS keys CROSS JOIN LATERAL (SELECT ctid AS row_id, sid, sess, expire, xmin, created_at, user_id, provider_sid FROM \"session\" WHERE sid = keys.k LIMIT 1) AS r), due AS (SELECT ctid AS row_id FROM \"session\" WHERE ctid = ANY(ARRAY(SELECT row_id FROM cur WHERE expire > $2 AND expire < $3 AND expire < LEAST($1, created_at + $4 * interval '1 second'))) FOR UPDATE SKIP LOCKED), touched AS (UPDATE \"session\" AS t SET expire = LEAST($1, t.created_at + $4 * interval '1 second'), last_seen = $2 WHERE ctid = ANY(ARRAY(SELECT row_id FROM due)) RETURNING t.sess::text AS sess, t.expire AS expire, t.xmin::text AS version, t.created_at, t.user_id, t.provider_sid, t.sid) SELECT sess, expire, version, created_at, user_id, provider_sid, true, sid::text FROM touched UNION ALL SELECT sess::text, expire, xmin::text, created_at, user_id, provider_sid, false, sid::text FROM cur WHERE expire > $2 AND NOT EXISTS (SELECT 1 FROM touched WHERE touched.sid = cur.sid)"
        );
        assert_eq!(
            sql.load_idle[1],
            "WITH cur AS MATERIALIZED (SELECT r.* FROM (SELECT DISTINCT k FROM unnest(ARRAY[$4, $5]::text[]) AS k) AS keys CROSS JOIN LATERAL (SELECT ctid AS row_id, sid, sess, expire, xmin, created_at, user_id, provider_sid FROM \"session\" WHERE sid = keys.k LIMIT 1) AS r), due AS (SELECT ctid AS row_id FROM \"session\" WHERE ctid = ANY(ARRAY(SELECT row_id FROM cur WHERE expire > $2 AND expire < $3 AND expire < $1)) FOR UPDATE SKIP LOCKED), touched AS (UPDATE \"session\" AS t SET expire = $1, last_seen = $2 WHERE ctid = ANY(ARRAY(SELECT row_id FROM due)) RETURNING t.sess::text AS sess, t.expire AS expire, t.xmin::text AS version, t.created_at, t.user_id, t.provider_sid, t.sid) SELECT sess, expire, version, created_at, user_id, provider_sid, true, sid::text FROM touched UNION ALL SELECT sess::text, expire, xmin::text, created_at, user_id, provider_sid, false, sid::text FROM cur WHERE expire > $2 AND NOT EXISTS (SELECT 1 FROM touched WHERE touched.sid = cur.sid)"
        );
        assert_eq!(
            sql.update_many[0],
            "WITH v (sid, sess, expire, version, user_id, provider_sid) AS (VALUES ($2::text, $3::text, $4::timestamptz, $5::xid, $6::text, $7::text)), cur AS MATERIALIZED (SELECT r.* FROM (SELECT DISTINCT k FROM unnest(ARRAY[$2]::text[]) AS k) AS keys CROSS JOIN LATERAL (SELECT ctid AS row_id, expire FROM \"session\" WHERE sid = keys.k LIMIT 1) AS r), free AS (SELECT ctid AS row_id, sid, xmin FROM \"session\" WHERE ctid = ANY(ARRAY(SELECT row_id FROM cur WHERE expire > $1)) FOR UPDATE SKIP LOCKED) UPDATE \"session\" AS t SET sess = v.sess::json, expire = v.expire, user_id = v.user_id, provider_sid = v.provider_sid, last_seen = $1 FROM v JOIN free ON free.sid = v.sid AND free.xmin = v.version WHERE t.ctid = ANY(ARRAY(SELECT row_id FROM free)) AND t.ctid = free.row_id RETURNING v.sid::text, t.xmin::text"
        );
        assert_eq!(
            sql.update_many[1],
            "WITH v (sid, sess, expire, version, user_id, provider_sid) AS (VALUES ($2::text, $3::text, $4::timestamptz, $5::xid, $6::text, $7::text), ($8::text, $9::text, $10::timestamptz, $11::xid, $12::text, $13::text)), cur AS MATERIALIZED (SELECT r.* FROM (SELECT DISTINCT k FROM unnest(ARRAY[$2, $8]::text[]) AS k) AS keys CROSS JOIN LATERAL (SELECT ctid AS row_id, expire FROM \"session\" WHERE sid = keys.k LIMIT 1) AS r), free AS (SELECT ctid AS row_id, sid, xmin FROM \"session\" WHERE ctid = ANY(ARRAY(SELECT row_id FROM cur WHERE expire > $1)) FOR UPDATE SKIP LOCKED) UPDATE \"session\" AS t SET sess = v.sess::json, expire = v.expire, user_id = v.user_id, provider_sid = v.provider_sid, last_seen = $1 FROM v JOIN free ON free.sid = v.sid AND free.xmin = v.version WHERE t.ctid = ANY(ARRAY(SELECT row_id FROM free)) AND t.ctid = free.row_id RETURNING v.sid::text, t.xmin::text"
        );
    }

    /// A schema-qualified table with `jsonb`, `timestamp` in Europe/Berlin, the extra columns.
    #[test]
    fn a_schema_qualified_jsonb_table_in_a_named_zone() {
        let sql = sql(
            Some("auth"),
            "web_sessions",
            Layout {
                sess: SessType::Jsonb,
                expire: ExpireType::WithoutTimeZone("Europe/Berlin".into()),
                extended: true,
            },
        );
        assert_eq!(
            sql.insert,
            "INSERT INTO \"auth\".\"web_sessions\" (sid, sess, expire, created_at, last_seen, user_id, provider_sid, user_agent, ip) VALUES ($1, $2::jsonb, ($3 AT TIME ZONE 'Europe/Berlin'), $4, $4, $5, $6, $7, $8) ON CONFLICT (sid) DO NOTHING RETURNING xmin::text"
        );
        assert_eq!(
            sql.update,
            "UPDATE \"auth\".\"web_sessions\" SET sid = $2, sess = $3::jsonb, expire = ($4 AT TIME ZONE 'Europe/Berlin'), user_id = $7, provider_sid = $8, last_seen = $6 WHERE sid = $1 AND xmin = $5::xid AND expire > ($6 AT TIME ZONE 'Europe/Berlin') AND set_config('lock_timeout', '5000', true) IS NOT NULL RETURNING xmin::text"
        );
        assert_eq!(
            sql.select_for_update,
            "SELECT sess::text, (expire AT TIME ZONE 'Europe/Berlin'), xmin::text, created_at, user_id, provider_sid, false FROM \"auth\".\"web_sessions\" WHERE sid = $1 AND expire > ($2 AT TIME ZONE 'Europe/Berlin') AND set_config('lock_timeout', '5000', true) IS NOT NULL FOR UPDATE"
        );
        assert_eq!(
            sql.update_locked,
            "UPDATE \"auth\".\"web_sessions\" SET sid = $2, sess = $3::jsonb, expire = ($4 AT TIME ZONE 'Europe/Berlin'), user_id = $5, provider_sid = $6 WHERE sid = $1 RETURNING xmin::text"
        );
        assert_eq!(
            sql.delete,
            "DELETE FROM \"auth\".\"web_sessions\" WHERE sid = $1 AND set_config('lock_timeout', '5000', true) IS NOT NULL"
        );
        assert_eq!(
            sql.save_any,
            "UPDATE \"auth\".\"web_sessions\" SET sess = $2::jsonb, expire = ($3 AT TIME ZONE 'Europe/Berlin') WHERE sid = $1"
        );
        assert_eq!(
            sql.prune_batch,
            "WITH no_sync AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)), next AS MATERIALIZED (SELECT expire FROM \"auth\".\"web_sessions\" WHERE expire >= $3::timestamp AND expire < ($1 AT TIME ZONE 'Europe/Berlin') AND EXISTS (SELECT FROM no_sync) ORDER BY expire OFFSET $2 LIMIT 1), gone AS (DELETE FROM \"auth\".\"web_sessions\" WHERE expire >= $3::timestamp AND expire < coalesce((SELECT expire FROM next), ($1 AT TIME ZONE 'Europe/Berlin')) RETURNING 1) SELECT (SELECT count(*) FROM gone), (SELECT expire::text FROM next)"
        );
        assert_eq!(
            sql.prune_tied,
            "WITH no_sync AS MATERIALIZED (SELECT set_config('synchronous_commit', 'off', true)), gone AS (DELETE FROM \"auth\".\"web_sessions\" WHERE ctid = ANY(ARRAY(SELECT ctid FROM \"auth\".\"web_sessions\" WHERE expire = $3::timestamp AND expire < ($1 AT TIME ZONE 'Europe/Berlin') AND EXISTS (SELECT FROM no_sync) LIMIT $2)) AND expire = $3::timestamp AND expire < ($1 AT TIME ZONE 'Europe/Berlin') RETURNING 1) SELECT count(*) FROM gone"
        );
        assert_eq!(
            sql.load[0],
            "WITH cur AS MATERIALIZED (SELECT r.* FROM (SELECT DISTINCT k FROM unnest(ARRAY[$5]::text[]) AS k) AS keys CROSS JOIN LATERAL (SELECT ctid AS row_id, sid, sess, expire, xmin, created_at, user_id, provider_sid FROM \"auth\".\"web_sessions\" WHERE sid = keys.k LIMIT 1) AS r), due AS (SELECT ctid AS row_id FROM \"auth\".\"web_sessions\" WHERE ctid = ANY(ARRAY(SELECT row_id FROM cur WHERE expire > ($2 AT TIME ZONE 'Europe/Berlin') AND expire < ($3 AT TIME ZONE 'Europe/Berlin') AND expire < (LEAST($1, created_at + $4 * interval '1 second') AT TIME ZONE 'Europe/Berlin'))) FOR UPDATE SKIP LOCKED), touched AS (UPDATE \"auth\".\"web_sessions\" AS t SET expire = (LEAST($1, t.created_at + $4 * interval '1 second') AT TIME ZONE 'Europe/Berlin'), last_seen = $2 WHERE ctid = ANY(ARRAY(SELECT row_id FROM due)) RETURNING t.sess::text AS sess, (t.expire AT TIME ZONE 'Europe/Berlin') AS expire, t.xmin::text AS version, t.created_at, t.user_id, t.provider_sid, t.sid) SELECT sess, expire, version, created_at, user_id, provider_sid, true, sid::text FROM touched UNION ALL SELECT sess::text, (expire AT TIME ZONE 'Europe/Berlin'), xmin::text, created_at, user_id, provider_sid, false, sid::text FROM cur WHERE expire > ($2 AT TIME ZONE 'Europe/Berlin') AND NOT EXISTS (SELECT 1 FROM touched WHERE touched.sid = cur.sid)"
        );
        assert_eq!(
            sql.load_idle[1],
            "WITH cur AS MATERIALIZED (SELECT r.* FROM (SELECT DISTINCT k FROM unnest(ARRAY[$4, $5]::text[]) AS k) AS keys CROSS JOIN LATERAL (SELECT ctid AS row_id, sid, sess, expire, xmin, created_at, user_id, provider_sid FROM \"auth\".\"web_sessions\" WHERE sid = keys.k LIMIT 1) AS r), due AS (SELECT ctid AS row_id FROM \"auth\".\"web_sessions\" WHERE ctid = ANY(ARRAY(SELECT row_id FROM cur WHERE expire > ($2 AT TIME ZONE 'Europe/Berlin') AND expire < ($3 AT TIME ZONE 'Europe/Berlin') AND expire < ($1 AT TIME ZONE 'Europe/Berlin'))) FOR UPDATE SKIP LOCKED), touched AS (UPDATE \"auth\".\"web_sessions\" AS t SET expire = ($1 AT TIME ZONE 'Europe/Berlin'), last_seen = $2 WHERE ctid = ANY(ARRAY(SELECT row_id FROM due)) RETURNING t.sess::text AS sess, (t.expire AT TIME ZONE 'Europe/Berlin') AS expire, t.xmin::text AS version, t.created_at, t.user_id, t.provider_sid, t.sid) SELECT sess, expire, version, created_at, user_id, provider_sid, true, sid::text FROM touched UNION ALL SELECT sess::text, (expire AT TIME ZONE 'Europe/Berlin'), xmin::text, created_at, user_id, provider_sid, false, sid::text FROM cur WHERE expire > ($2 AT TIME ZONE 'Europe/Berlin') AND NOT EXISTS (SELECT 1 FROM touched WHERE touched.sid = cur.sid)"
        );
        assert_eq!(
            sql.update_many[0],
            "WITH v (sid, sess, expire, version, user_id, provider_sid) AS (VALUES ($2::text, $3::text, $4::timestamptz, $5::xid, $6::text, $7::text)), cur AS MATERIALIZED (SELECT r.* FROM (SELECT DISTINCT k FROM unnest(ARRAY[$2]::text[]) AS k) AS keys CROSS JOIN LATERAL (SELECT ctid AS row_id, expire FROM \"auth\".\"web_sessions\" WHERE sid = keys.k LIMIT 1) AS r), free AS (SELECT ctid AS row_id, sid, xmin FROM \"auth\".\"web_sessions\" WHERE ctid = ANY(ARRAY(SELECT row_id FROM cur WHERE expire > ($1 AT TIME ZONE 'Europe/Berlin'))) FOR UPDATE SKIP LOCKED) UPDATE \"auth\".\"web_sessions\" AS t SET sess = v.sess::jsonb, expire = (v.expire AT TIME ZONE 'Europe/Berlin'), user_id = v.user_id, provider_sid = v.provider_sid, last_seen = $1 FROM v JOIN free ON free.sid = v.sid AND free.xmin = v.version WHERE t.ctid = ANY(ARRAY(SELECT row_id FROM free)) AND t.ctid = free.row_id RETURNING v.sid::text, t.xmin::text"
        );
        assert_eq!(
            sql.update_many[1],
            "WITH v (sid, sess, expire, version, user_id, provider_sid) AS (VALUES ($2::text, $3::text, $4::timestamptz, $5::xid, $6::text, $7::text), ($8::text, $9::text, $10::timestamptz, $11::xid, $12::text, $13::text)), cur AS MATERIALIZED (SELECT r.* FROM (SELECT DISTINCT k FROM unnest(ARRAY[$2, $8]::text[]) AS k) AS keys CROSS JOIN LATERAL (SELECT ctid AS row_id, expire FROM \"auth\".\"web_sessions\" WHERE sid = keys.k LIMIT 1) AS r), free AS (SELECT ctid AS row_id, sid, xmin FROM \"auth\".\"web_sessions\" WHERE ctid = ANY(ARRAY(SELECT row_id FROM cur WHERE expire > ($1 AT TIME ZONE 'Europe/Berlin'))) FOR UPDATE SKIP LOCKED) UPDATE \"auth\".\"web_sessions\" AS t SET sess = v.sess::jsonb, expire = (v.expire AT TIME ZONE 'Europe/Berlin'), user_id = v.user_id, provider_sid = v.provider_sid, last_seen = $1 FROM v JOIN free ON free.sid = v.sid AND free.xmin = v.version WHERE t.ctid = ANY(ARRAY(SELECT row_id FROM free)) AND t.ctid = free.row_id RETURNING v.sid::text, t.xmin::text"
        );
    }

    #[test]
    fn epoch_seconds_read_as_numeric_or_float_text() {
        let at = |s| epoch_seconds(s).map(|t| t.unix_timestamp_nanos() / 1000);
        assert_eq!(at("1764586200.123456"), Some(1_764_586_200_123_456));
        assert_eq!(at("1764586200"), Some(1_764_586_200_000_000));
        assert_eq!(at("1764586200.5"), Some(1_764_586_200_500_000));
        // A float's extra digits round to the microsecond.
        assert_eq!(at("1764586200.1234567"), Some(1_764_586_200_123_457));
        assert_eq!(at("-1.5"), Some(-1_500_000));
        for bad in [
            "",
            "-",
            ".5",
            "1e9",
            "1.2.3",
            "12a",
            " 1",
            "99999999999999999999",
        ] {
            assert_eq!(at(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn literals_escape_every_quote_and_backslash() {
        assert_eq!(literal("abc").as_deref(), Some("E'abc'"));
        assert_eq!(literal("a'b\\c").as_deref(), Some("E'a\\'b\\\\c'"));
        assert_eq!(literal("nul\0"), None);
        for hostile in ["'; DROP TABLE x; --", "\\'", "$$", "\\", "'", "é'\\n"] {
            let lit = literal(hostile).unwrap_or_default();
            let inner = &lit[2..lit.len() - 1];
            // Take the escapes out: no quote or backslash may remain.
            let bare = inner.replace("\\\\", "").replace("\\'", "");
            assert!(
                !bare.contains('\'') && !bare.contains('\\'),
                "{hostile:?} -> {lit}"
            );
        }
        let at =
            OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap_or_else(|_| unreachable!());
        assert_eq!(
            instant_literal(at),
            "'2023-11-14T22:13:20.000000Z'::timestamptz"
        );
    }

    #[test]
    fn inlined_values_replace_each_placeholder_once_and_only_there() {
        let at =
            OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap_or_else(|_| unreachable!());
        let sql = "SELECT $1, $10, '$2', $2::xid, $3 AT TIME ZONE 'UTC', $";
        let mut stmt = Stmt::new(sql).text("a'$1").opt(None).at(at);
        for n in 4..=10 {
            stmt = stmt.text(if n == 10 { "ten" } else { "x" });
        }
        assert_eq!(
            stmt.inlined().as_deref(),
            Some(
                "SELECT E'a\\'$1', E'ten', '$2', NULL::xid, \
                 '2023-11-14T22:13:20.000000Z'::timestamptz AT TIME ZONE 'UTC', $"
            )
        );
        // A value no literal can carry; a placeholder with no value.
        assert_eq!(Stmt::new("SELECT $1").text("a\0b").inlined(), None);
        assert_eq!(Stmt::new("SELECT $2").text("a").inlined(), None);
        assert_eq!(Stmt::new("SELECT $0").inlined(), None);
    }

    /// Behind a transaction pooler: the function that holds the shared
    /// save, and its call with the rows as arrays.
    #[test]
    fn the_shared_saves_function_and_its_call() {
        let ident = |s: &str| Ident::new(s).unwrap_or_else(|_| unreachable!());
        let name = TableName {
            schema: Some(ident("app")),
            table: ident("session"),
        };
        let layout = Layout {
            sess: SessType::Json,
            expire: ExpireType::WithoutTimeZone("UTC".into()),
            extended: true,
        };
        let save = Table::new(&name, &layout, std::time::Duration::ZERO).save_function(&name);
        assert_eq!(save.name, "\"app\".\"session_save_dff8d36523bd\"");
        assert_eq!(save.ddl, "CREATE FUNCTION \"app\".\"session_save_dff8d36523bd\"(p_now timestamptz, p_sid text[], p_sess text[], p_expire timestamptz[], p_version xid[], p_user_id text[], p_provider_sid text[]) RETURNS TABLE (sid text, version text) LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan AS $fn$ #variable_conflict use_column\nBEGIN RETURN QUERY WITH v AS (SELECT * FROM unnest(p_sid, p_sess, p_expire, p_version, p_user_id, p_provider_sid) AS v (sid, sess, expire, version, user_id, provider_sid)), cur AS MATERIALIZED (SELECT r.* FROM (SELECT DISTINCT k FROM unnest(p_sid) AS k) AS keys CROSS JOIN LATERAL (SELECT ctid AS row_id, expire FROM \"app\".\"session\" WHERE sid = keys.k LIMIT 1) AS r), free AS (SELECT ctid AS row_id, sid, xmin FROM \"app\".\"session\" WHERE ctid = ANY(ARRAY(SELECT row_id FROM cur WHERE expire > (p_now AT TIME ZONE 'UTC'))) FOR UPDATE SKIP LOCKED) UPDATE \"app\".\"session\" AS t SET sess = v.sess::json, expire = (v.expire AT TIME ZONE 'UTC'), user_id = v.user_id, provider_sid = v.provider_sid, last_seen = p_now FROM v JOIN free ON free.sid = v.sid AND free.xmin = v.version WHERE t.ctid = ANY(ARRAY(SELECT row_id FROM free)) AND t.ctid = free.row_id RETURNING v.sid::text, t.xmin::text; END $fn$");
        let sql = Sql::new(
            &name,
            &layout,
            std::time::Duration::from_millis(5000),
            Some(&save.name),
        );
        assert_eq!(sql.update_many_text[1], "SELECT sid, version FROM \"app\".\"session_save_dff8d36523bd\"($1, ARRAY[$2, $8]::text[], ARRAY[$3, $9]::text[], ARRAY[$4, $10]::timestamptz[], ARRAY[$5, $11]::xid[], ARRAY[$6, $12]::text[], ARRAY[$7, $13]::text[])");
        // A longer table name is shortened, never the digest.
        let long = TableName {
            schema: None,
            table: ident(&"s".repeat(63)),
        };
        let name = Table::new(&long, &layout, std::time::Duration::ZERO)
            .save_function(&long)
            .name;
        let parts = name.trim_matches('"').rsplit_once("_save_");
        let lengths = parts.map(|(table, digest)| (table.len(), digest.len()));
        assert_eq!(lengths, Some((63 - 18, 12)), "{name}");
    }
}
