//! docker-compose.yml, checked as far as a machine without a Docker engine allows: against the
//! Compose specification's JSON schema, and every `wsimil` command in it against wsimil's own
//! command line.

use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::Command;
use wsimil_coordinator::cli::Cli;

fn tools() -> PathBuf {
    std::env::var_os("WSIMIL_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| wsimil_common::data_dir().parent().expect("cache dir").join("tools"))
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Validate `compose` against the schema; the parsed document, or the validator's complaints.
fn validate(compose: &Path) -> Result<serde_json::Value, String> {
    let python = tools().join("venv/bin/python");
    let schema = tools().join("compose_spec.json");
    assert!(
        python.is_file() && schema.is_file(),
        "run scripts/fetch-tools.sh (no {} or {})",
        python.display(),
        schema.display()
    );
    let out =
        Command::new(python).arg(repo().join("scripts/validate_compose.py")).arg(compose).arg(schema).output().unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect()).unwrap_or_default()
}

#[test]
fn compose_file_follows_the_compose_schema_and_runs_real_wsimil_commands() {
    let doc = validate(&repo().join("docker-compose.yml")).unwrap_or_else(|e| panic!("schema violations:\n{e}"));
    let services = doc["services"].as_object().unwrap();
    // NATS with JetStream, MinIO with its bucket created at start.
    assert!(strings(&services["nats"]["command"]).contains(&"-js".to_string()));
    assert_eq!(services["minio-bucket"]["depends_on"]["minio"]["condition"], "service_healthy");
    assert!(strings(&services["minio-bucket"]["command"]).join(" ").contains("mc mb --ignore-existing local/wsimil"));
    // A coordinator, two CPU workers in the default profile, a GPU worker in its own profile.
    let workers: Vec<&String> = services
        .keys()
        .filter(|k| strings(&services[k.as_str()]["command"]).first().map(String::as_str) == Some("worker"))
        .collect();
    let default_workers = workers.iter().filter(|k| services[k.as_str()].get("profiles").is_none()).count();
    assert!(default_workers >= 2, "{workers:?}");
    let gpu = &services["worker-gpu"];
    assert_eq!(strings(&gpu["profiles"]), vec!["gpu"]);
    assert_eq!(gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"], "nvidia");
    assert_eq!(services["coordinator"]["environment"]["WSIMIL_NATS_URL"], "nats://nats:4222");
    // Every wsimil command is one our CLI accepts (catches renamed or misspelt flags).
    let mut checked = 0;
    for (name, svc) in services {
        if svc["image"] != "wsimil:latest" {
            continue;
        }
        let command = strings(&svc["command"]);
        let argv: Vec<String> = if strings(&svc["entrypoint"]).first().map(String::as_str) == Some("/bin/sh") {
            // A shell line: check the wsimil invocation in it.
            let line = &command[0];
            let at = line.find("wsimil ").unwrap_or_else(|| panic!("{name}: no wsimil call in {line:?}"));
            line[at..].split_whitespace().map(str::to_string).collect()
        } else {
            std::iter::once("wsimil".to_string()).chain(command).collect()
        };
        Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{name}: {argv:?} is not a valid wsimil command:\n{e}"));
        checked += 1;
    }
    assert!(checked >= 5, "{checked} wsimil services checked");
}

#[test]
fn the_schema_check_rejects_a_broken_compose_file() {
    let text = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    let broken = text.replacen("    healthcheck:\n", "    healthcheck:\n      retriez: 3\n", 1);
    assert_ne!(broken, text);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("docker-compose.yml");
    std::fs::write(&path, broken).unwrap();
    let err = validate(&path).expect_err("an unknown healthcheck key must be rejected");
    assert!(err.contains("retriez"), "{err}");
}
