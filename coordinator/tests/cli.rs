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
fn unknown_choices_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.csv");
    std::fs::write(&m, "slide_id,path,label\n").unwrap();
    for (flag, value, needle) in [
        ("--model", "gru", "unknown --model \"gru\""),
        ("--tissue-preset", "lung", "unknown --tissue-preset \"lung\""),
        ("--tissue-threshold", "high", "--tissue-threshold \"high\""),
    ] {
        let out = wsimil()
            .args(["run", "--manifest", m.to_str().unwrap(), "--random-weights", "1", flag, value])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{flag}: {err}");
    }
}
