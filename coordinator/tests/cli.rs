//! The `wsimil` binary as a user meets it.

use std::process::Command;

fn wsimil() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wsimil"))
}

#[test]
fn a_bad_manifest_lists_every_problem_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.svs"), b"x").unwrap();
    let m = dir.path().join("cohort.csv");
    std::fs::write(&m, "slide_id,path,label\na,a.svs,tumor\na,a.svs,normal\nb/c,a.svs,normal\nd,nope.svs,normal\n")
        .unwrap();
    let out = wsimil()
        .args([
            "run",
            "--manifest",
            m.to_str().unwrap(),
            "--store",
            dir.path().join("store").to_str().unwrap(),
            "--random-weights",
            "1",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("3 problems in the manifest"), "{err}");
    assert!(err.contains("line 3: duplicate slide_id \"a\""), "{err}");
    assert!(err.contains("line 4: slide_id \"b/c\""), "{err}");
    assert!(err.contains("line 5: d: slide file not found"), "{err}");
    assert!(!dir.path().join("store/runs").exists(), "nothing is written for an invalid cohort");
}

#[test]
fn unknown_choices_are_named_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.svs"), b"x").unwrap();
    let m = dir.path().join("m.csv");
    std::fs::write(&m, "slide_id,path,label\na,a.svs,tumor\n").unwrap();
    let store = dir.path().join("store");
    for (flag, value, needles) in [
        ("--model", "gru", &["invalid value 'gru' for '--model", "transmil, abmil"][..]),
        ("--optimizer", "sgdx", &["invalid value 'sgdx' for '--optimizer", "lookahead-radam, radam, adamw"]),
        ("--embedder", "resnet51", &["unknown embedder \"resnet51\"", "uni2-h", "vit:<timm-name>"]),
        ("--embedder", "vit:vit_medium_patch16_224", &["unknown size \"medium\""]),
        ("--until", "finetune", &["invalid value 'finetune' for '--until", "tile, embed, train, predict"]),
        ("--tissue-preset", "lung", &["invalid value 'lung' for '--tissue-preset", "tcga, biopsy"]),
        ("--tissue-threshold", "high", &["\"high\": otsu or 0-255"]),
        ("--on-corrupt-tile", "ignore", &["invalid value 'ignore' for '--on-corrupt-tile", "skip, fail"]),
        ("--precision", "f8", &["invalid value 'f8' for '--precision", "auto, f32, bf16, f16"]),
    ] {
        let out = wsimil()
            .args([
                "run",
                "--manifest",
                m.to_str().unwrap(),
                "--store",
                store.to_str().unwrap(),
                "--random-weights",
                "1",
            ])
            .args([flag, value])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        for needle in needles {
            assert!(err.contains(needle), "{flag} {value}: {needle:?} not in {err}");
        }
        assert!(!store.exists(), "{flag} {value}: refused before anything was written");
    }
    // Flags that contradict each other, said before any work.
    let out = wsimil()
        .args(["run", "--manifest", m.to_str().unwrap(), "--store", store.to_str().unwrap(), "--random-weights", "1"])
        .args(["--final-model", "--until", "embed"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--final-model") && err.contains("--until embed"), "{err}");
    assert!(!store.exists(), "--final-model with --until: refused before anything was written");
    // A device or a job kind that does not exist, refused by the worker before it connects.
    for (flag, value, needle) in [
        ("--device", "tpu", "unknown device \"tpu\" (auto, cpu, cuda, cuda:N)"),
        ("--kinds", "tile,train,dance", "invalid value 'dance' for '--kinds"),
    ] {
        let out = wsimil().args(["worker", "--nats", "nats://127.0.0.1:1", flag, value]).output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{flag} {value}: {needle:?} not in {err}");
        assert!(!err.contains("connect"), "{flag} {value}: refused before connecting: {err}");
    }
    // A mistyped reader is refused at start, once, not by every tile job.
    let out = wsimil()
        .args(["run", "--manifest", m.to_str().unwrap(), "--store", store.to_str().unwrap(), "--random-weights", "1"])
        .env("WSIMIL_READER", "nativ")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("WSIMIL_READER=\"nativ\": expected auto, native or openslide"), "{err}");
    assert!(!store.join("runs").exists(), "nothing planned");
}

#[test]
fn the_product_cli_has_no_benchmark_commands() {
    let help = wsimil().arg("--help").output().unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    for cmd in ["run", "worker", "status", "check-device", "demo-cohort", "import-bags"] {
        assert!(text.contains(cmd), "{cmd} missing from --help: {text}");
    }
    for cmd in ["bench-read", "make-slide", "bench-transmil", "bench-embed", "icmil-teacher-check"] {
        let out = wsimil().args([cmd, "--help"]).output().unwrap();
        assert!(!out.status.success(), "{cmd} is a wsimil-dev command, not a product one");
    }
}

/// `run --help` names every encoder preset, by wsimil's name and TRIDENT's.
#[test]
fn run_help_names_every_encoder_by_both_names() {
    let out = wsimil().args(["run", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
    for p in wsimil_common::models::zoo::VitPreset::ALL {
        for name in [p.name(), p.trident_name()] {
            let listed = text.split([' ', ',', '(', ')', ';']).any(|w| w == name);
            assert!(listed, "{name} is not in run --help: {text}");
        }
    }
}

#[test]
fn a_foundation_model_preset_says_where_its_weights_are_and_refuses_a_file_that_does_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.svs"), b"x").unwrap();
    let m = dir.path().join("m.csv");
    std::fs::write(&m, "slide_id,path,label\na,a.svs,tumor\nb,a.svs,normal\n").unwrap();
    let store = dir.path().join("store");
    let run = |extra: &[&str]| {
        let out = wsimil()
            .args(["run", "--manifest", m.to_str().unwrap(), "--store", store.to_str().unwrap(), "--embedder", "uni"])
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let err = run(&[]);
    assert!(
        err.contains("--embedder uni needs --weights FILE") && err.contains("huggingface.co/MahmoodLab/UNI"),
        "{err}"
    );
    // UNI's architecture at width 32 (the parity fixture) is not UNI: refused before any work,
    // the file and the tensors that differ named.
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../common/tests/fixtures/vit/uni.pytorch_model.bin");
    let err = run(&["--weights", fixture]);
    assert!(err.contains("uni.pytorch_model.bin: does not fit uni:") && err.contains("misshaped ("), "{err}");
    assert!(err.contains("cls_token: [1, 1, 32] in the file, [1, 1, 1024] needed"), "{err}");
    assert!(!store.join("runs").exists(), "nothing planned");
}
