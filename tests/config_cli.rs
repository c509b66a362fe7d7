//! `pgha check-config FILE` as an operator runs it: a valid file exits 0 with
//! a one-line summary; a bad one exits 2 and stderr names the file and the
//! key (or the environment variable) that is wrong.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A config file in its own temp dir; `bin_dir` points at that dir so the
/// test does not depend on a local PostgreSQL install.
struct ConfigFile {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl ConfigFile {
    fn valid() -> ConfigFile {
        ConfigFile::with(|text| text)
    }

    fn with(edit: impl FnOnce(String) -> String) -> ConfigFile {
        let dir = tempfile::tempdir().expect("temp dir");
        let text = format!(
            r#"scope = "demo"
name = "n1"

[etcd]
endpoints = ["http://127.0.0.1:2379"]

[postgresql]
data_dir = "/var/lib/pgha/n1/data"
bin_dir = '{}'
advertise_host = "127.0.0.1"

[postgresql.replication]
password = "change-me"

[api]
listen = ["127.0.0.1:8008"]
advertise_url = "http://127.0.0.1:8008"

[timing]
"#,
            dir.path().display()
        );
        let path = dir.path().join("pgha.toml");
        std::fs::write(&path, edit(text)).expect("write config");
        ConfigFile { dir, path }
    }
}

/// Runs `pgha check-config path` with only the given `PGHA_*` variables.
fn check_config(path: &Path, vars: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_pgha"));
    command.arg("check-config").arg(path);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PGHA_") {
            command.env_remove(name);
        }
    }
    command.envs(vars.iter().copied());
    command.output().expect("run pgha")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[track_caller]
fn assert_rejected(output: &Output, file: &Path, names: &[&str]) {
    let err = stderr(output);
    assert_eq!(output.status.code(), Some(2), "stderr: {err}");
    assert!(err.contains("error: "), "stderr: {err}");
    assert!(err.contains(&file.display().to_string()), "stderr: {err}");
    for name in names {
        assert!(err.contains(name), "stderr lacks {name}: {err}");
    }
}

#[test]
fn valid_config_exits_0_with_a_one_line_summary() {
    let config = ConfigFile::valid();
    let output = check_config(&config.path, &[]);
    let out = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    assert_eq!(out.trim_end().lines().count(), 1, "stdout: {out}");
    assert!(out.starts_with("config ok: "), "stdout: {out}");
    assert!(
        out.contains("scope=demo") && out.contains("name=n1"),
        "stdout: {out}"
    );
}

#[test]
fn env_overrides_apply() {
    let config = ConfigFile::valid();
    let output = check_config(&config.path, &[("PGHA_SCOPE", "prod")]);
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    assert!(
        stdout(&output).contains("scope=prod"),
        "{}",
        stdout(&output)
    );
}

#[test]
fn example_config_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/pgha.example.toml");
    let bin_dir = tempfile::tempdir().expect("temp dir");
    let output = check_config(
        &example,
        &[("PGHA_POSTGRESQL_BIN_DIR", bin_dir.path().to_str().unwrap())],
    );
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
    assert!(stdout(&output).starts_with("config ok: "));
}

/// Turns the valid file's text into an invalid one.
type Edit = fn(String) -> String;

#[test]
fn invalid_files_exit_2_naming_the_key() {
    let cases: &[(&str, Edit)] = &[
        ("postgresql.prot", |t| {
            t.replace("[postgresql]\n", "[postgresql]\nprot = 5432\n")
        }),
        ("colour", |t| format!("colour = \"blue\"\n{t}")),
        ("postgresql.port", |t| {
            t.replace("[postgresql]\n", "[postgresql]\nport = \"abc\"\n")
        }),
        ("postgresql.data_dir", |t| {
            t.replace("data_dir = \"/var/lib/pgha/n1/data\"\n", "")
        }),
        ("postgresql.replication.password", |t| {
            t.replace("password = \"change-me\"\n", "")
        }),
        ("timing.ttl", |t| {
            t.replace("[timing]\n", "[timing]\nttl = \"ten\"\n")
        }),
        ("timing.ttl", |t| {
            t.replace("[timing]\n", "[timing]\nttl = \"2s\"\n")
        }),
        ("timing", |t| {
            t.replace("[timing]\n", "[timing]\nloop_wait = \"5s\"\n")
        }),
        ("etcd.endpoints", |t| {
            t.replace("http://127.0.0.1:2379", "ftp://127.0.0.1:2379")
        }),
        ("api.listen", |t| {
            t.replace("127.0.0.1:8008\"]", "localhost:8008\"]")
        }),
        ("api.advertise_url", |t| {
            t.replace("\"http://127.0.0.1:8008\"", "\"127.0.0.1:8008\"")
        }),
        ("postgresql.replication.password_file", |t| {
            t.replace(
                "password = \"change-me\"\n",
                "password = \"change-me\"\npassword_file = \"pw\"\n",
            )
        }),
        ("postgresql.socket_dir", |t| {
            t.replace(
                "/var/lib/pgha/n1/data",
                &format!("/{}/data", "d".repeat(100)),
            )
        }),
    ];
    for (key, edit) in cases {
        let config = ConfigFile::with(edit);
        let output = check_config(&config.path, &[]);
        assert_rejected(&output, &config.path, &[key]);
    }
}

#[test]
fn bad_router_values_exit_2_naming_the_key_and_what_was_expected() {
    let cases: &[(&str, Edit)] = &[
        (
            "router.hold_timeout: expected a duration like \"10s\", got \"ten\"",
            |t| format!("{t}\n[router]\nhold_timeout = \"ten\"\n"),
        ),
        ("router.listen: expected an address like", |t| {
            format!("{t}\n[router]\nlisten = \"localhost:5432\"\n")
        }),
        ("router.enabled: expected a boolean", |t| {
            format!("{t}\n[router]\nenabled = \"yes please\"\n")
        }),
        ("router.keepalive: expected whole seconds", |t| {
            format!("{t}\n[router]\nkeepalive = \"1500ms\"\n")
        }),
        // On, the default listener would take Postgres' port.
        (
            "router.listen: \"[::]:5432\" takes port 5432 from Postgres",
            |t| format!("{t}\n[router]\nenabled = true\n"),
        ),
    ];
    for (expected, edit) in cases {
        let config = ConfigFile::with(edit);
        let output = check_config(&config.path, &[]);
        assert_rejected(&output, &config.path, &[expected]);
    }
    let config = ConfigFile::valid();
    let output = check_config(&config.path, &[("PGHA_ROUTER_CONNECT_TIMEOUT", "0s")]);
    assert_rejected(
        &output,
        &config.path,
        &["PGHA_ROUTER_CONNECT_TIMEOUT (router.connect_timeout): expected a duration of more than 0s"],
    );
    // A valid router section passes.
    let config = ConfigFile::with(|t| {
        format!("{t}\n[router]\nenabled = true\nlisten = \"127.0.0.1:6432\"\nreplica_listen = \"127.0.0.1:6434\"\n")
    });
    let output = check_config(&config.path, &[]);
    assert_eq!(output.status.code(), Some(0), "stderr: {}", stderr(&output));
}

#[test]
fn bad_environment_exits_2_naming_the_variable() {
    let config = ConfigFile::valid();
    let output = check_config(&config.path, &[("PGHA_TIMING_TTLL", "10s")]);
    assert_rejected(&output, &config.path, &["PGHA_TIMING_TTLL"]);

    let output = check_config(&config.path, &[("PGHA_TIMING_TTL", "ten")]);
    assert_rejected(&output, &config.path, &["PGHA_TIMING_TTL (timing.ttl)"]);
}

#[test]
fn syntax_error_exits_2_with_line_and_column() {
    let config = ConfigFile::with(|t| t.replace("name = \"n1\"", "name = \"n1"));
    let output = check_config(&config.path, &[]);
    let location = format!("{}:2:", config.path.display());
    assert_rejected(&output, &config.path, &[&location]);
}

#[test]
fn missing_file_exits_2_naming_it() {
    let config = ConfigFile::valid();
    let missing = config.dir.path().join("missing.toml");
    let output = check_config(&missing, &[]);
    assert_rejected(&output, &missing, &[]);
}

#[test]
fn api_urls_with_unbracketed_ipv6_literals_exit_2() {
    let output = Command::new(env!("CARGO_BIN_EXE_pgha"))
        .args(["list", "--api", "http://fdaa::2:8008"])
        .output()
        .expect("run pgha");
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("--api \"http://fdaa::2:8008\": an IPv6 address goes in brackets"),
        "{}",
        stderr(&output)
    );
}
