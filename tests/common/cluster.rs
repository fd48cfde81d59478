//! A throwaway PostgreSQL cluster (initdb, pg_ctl) in a temporary directory
//! on a free port of 127.0.0.1, for tests that stop or restart the server:
//! never the shared one. Stopped and removed on drop, even on failure.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    pub port: u16,
    pub url: String,
}

/// The newest installed server binaries (Debian keeps them off PATH).
fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect(
            "PostgreSQL server binaries under /usr/lib/postgresql (scripts/test.sh installs them)",
        )
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop().expect("initdb and pg_ctl")
}

impl Cluster {
    pub fn start() -> Self {
        let bin = bin_dir();
        // initdb refuses to run as root: the postgres account runs it then.
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.starts_with(b"0\n"))
            .unwrap_or(false);
        let dir = std::env::temp_dir().join(format!("tps-cluster-{}", super::random_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cluster = Self {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
            bin,
            as_postgres,
            port,
        };
        if as_postgres {
            assert!(Command::new("chown")
                .arg("postgres:")
                .arg(&cluster.dir)
                .status()
                .unwrap()
                .success());
        }
        let data = cluster.data();
        assert!(
            cluster.run(
                "initdb",
                &["-D", &data, "-U", "postgres", "-A", "trust", "--no-sync"]
            ),
            "initdb"
        );
        cluster.pg_ctl_start();
        cluster
    }

    fn data(&self) -> String {
        self.dir.join("data").to_str().unwrap().to_owned()
    }

    fn run(&self, tool: &str, args: &[&str]) -> bool {
        let tool = self.bin.join(tool);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&tool);
            c
        } else {
            Command::new(&tool)
        };
        command
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    fn pg_ctl(&self, action: &str, extra: &[&str]) -> bool {
        let data = self.data();
        let log = self.dir.join("log");
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {}",
            self.port,
            self.dir.to_str().unwrap()
        );
        let mut args = vec!["-D", &data, "-o", &opts, "-l", log.to_str().unwrap(), "-w"];
        args.extend_from_slice(extra);
        args.push(action);
        self.run("pg_ctl", &args)
    }

    pub fn pg_ctl_start(&self) {
        assert!(self.pg_ctl("start", &[]), "pg_ctl start");
    }

    /// `pg_ctl restart -m fast`: open connections are ended at once.
    pub fn restart_fast(&self) {
        assert!(self.pg_ctl("restart", &["-m", "fast"]), "pg_ctl restart");
    }

    pub fn stop_fast(&self) {
        assert!(self.pg_ctl("stop", &["-m", "fast"]), "pg_ctl stop");
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.pg_ctl("stop", &["-m", "immediate"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
