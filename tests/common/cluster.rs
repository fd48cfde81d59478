//! Throwaway PostgreSQL clusters on free ports, for what the shared server
//! cannot show: TLS, password authentication, a primary and its standby.
//! Each lives in a temporary directory removed on drop, with its server
//! stopped (immediately) even when the test fails.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// The newest server installed the Debian way (its tools are off PATH).
fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL's server tools in /usr/lib/postgresql (scripts/test.sh installs them)")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").is_file())
        .collect();
    versions.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
            .unwrap_or(0)
    });
    versions.pop().expect("an initdb under /usr/lib/postgresql")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs a server tool (as `postgres` when root: the server refuses root).
pub fn pg_tool(tool: &str, args: &[&str]) -> (bool, String) {
    let path = bin_dir().join(tool);
    let mut cmd = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&path);
        c
    } else {
        Command::new(&path)
    };
    let out = cmd
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A directory the server's user can write, removed by [`Cluster`]'s drop
/// (or by the caller).
pub fn work_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tower-pg-session-{name}-{}-{}",
        std::process::id(),
        super::random_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    if is_root() {
        Command::new("chown")
            .arg("postgres:")
            .arg(&dir)
            .status()
            .unwrap();
    }
    dir
}

/// Makes `path` belong to the server's user (keys must, with mode 0600).
pub fn give_to_postgres(path: &Path) {
    if is_root() {
        Command::new("chown")
            .args(["-R", "postgres:"])
            .arg(path)
            .status()
            .unwrap();
    }
}

/// A new data directory at `data`: superuser `postgres`, trust auth.
pub fn initdb(data: &Path) {
    let (ok, out) = pg_tool(
        "initdb",
        &[
            "-D",
            data.to_str().unwrap(),
            "-U",
            "postgres",
            "-A",
            "trust",
            "--no-sync",
        ],
    );
    assert!(ok, "initdb failed: {out}");
}

pub struct Cluster {
    pub port: u16,
    pub data: PathBuf,
    /// Removed on drop when this cluster owns it.
    dir: Option<PathBuf>,
    /// Server settings given on the command line (not copied by base backups).
    opts: String,
}

impl Cluster {
    /// `initdb` (trust, or the given `pg_hba.conf` lines), then starts it on
    /// a free port with `settings` (`-c name=value` each).
    pub fn new(hba: Option<&str>, settings: &[&str]) -> Self {
        let dir = work_dir("cluster");
        let data = dir.join("data");
        initdb(&data);
        if let Some(hba) = hba {
            std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
            give_to_postgres(&data.join("pg_hba.conf"));
        }
        let cluster = Self::on(data, Some(dir), settings);
        cluster.start();
        cluster
    }

    fn on(data: PathBuf, dir: Option<PathBuf>, settings: &[&str]) -> Self {
        let port = free_port();
        let socket_dir = data.parent().unwrap().to_str().unwrap().to_owned();
        let mut opts =
            format!("-c listen_addresses=127.0.0.1 -p {port} -k {socket_dir} -c fsync=off");
        for s in settings {
            opts.push_str(&format!(" -c {s}"));
        }
        Self {
            port,
            data,
            dir,
            opts,
        }
    }

    pub fn start(&self) {
        let log = self
            .data
            .parent()
            .unwrap()
            .join(format!("log-{}", self.port));
        let (ok, out) = pg_tool(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-o",
                &self.opts,
                "-l",
                log.to_str().unwrap(),
                "-w",
                "-t",
                "30",
                "start",
            ],
        );
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(ok, "pg_ctl start failed: {out}\n{log}");
    }

    /// Stops the server (`fast`: clients are disconnected, WAL is sent to
    /// the standbys first).
    pub fn stop(&self) {
        let _ = pg_tool(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
    }

    /// `pg_ctl restart -m fast`: open connections are ended at once.
    pub fn restart_fast(&self) {
        self.stop();
        self.start();
    }

    /// A streaming standby of this cluster (`pg_basebackup -R`), started on
    /// a free port, sharing this cluster's directory.
    pub fn standby(&self) -> Cluster {
        let parent = self.data.parent().unwrap();
        let data = parent.join(format!("standby-{}", free_port()));
        let (ok, out) = pg_tool(
            "pg_basebackup",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-D",
                data.to_str().unwrap(),
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ],
        );
        assert!(ok, "pg_basebackup failed: {out}");
        // The standby names itself, so the primary can wait for it.
        let conf = data.join("postgresql.auto.conf");
        let auto = std::fs::read_to_string(&conf).unwrap();
        std::fs::write(
            &conf,
            auto.replace(
                "primary_conninfo = '",
                "primary_conninfo = 'application_name=standby ",
            ),
        )
        .unwrap();
        let standby = Self::on(data, None, &[]);
        standby.start();
        standby
    }

    pub fn promote(&self) {
        let (ok, out) = pg_tool(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-w",
                "-t",
                "30",
                "promote",
            ],
        );
        assert!(ok, "pg_ctl promote failed: {out}");
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = pg_tool(
            "pg_ctl",
            &[
                "-D",
                self.data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
