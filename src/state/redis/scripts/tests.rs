use super::*;

const MS: Duration = Duration::from_millis(1);

#[test]
fn an_admission_names_its_tightest_key_and_every_count() {
    let reply = AdmitReply::decode(&[1, 1_700_000_000_000_000, 2, 7, 1_500_000, 3, 12], 2);
    assert_eq!(
        reply,
        Ok(AdmitReply::Admitted(Admitted {
            tightest: Some(Tightest {
                key: 1,
                remaining: 7,
                reset: 1500 * MS,
            }),
            counts: vec![3, 12],
        }))
    );
    // Only concurrency keys: no rate key is the tightest.
    let reply = AdmitReply::decode(&[1, 5, 0, -1, 0, 1], 1);
    assert_eq!(
        reply,
        Ok(AdmitReply::Admitted(Admitted {
            tightest: None,
            counts: vec![1],
        }))
    );
    // A key whose room is unknown reports no headroom.
    let reply = AdmitReply::decode(&[1, 5, 1, -1, 9, 1], 1);
    assert!(matches!(
        reply,
        Ok(AdmitReply::Admitted(Admitted { tightest: None, .. }))
    ));
}

#[test]
fn a_refusal_names_the_key_and_when_it_has_room() {
    let reply = AdmitReply::decode(&[0, 250_000, 1, 0, 0, 10, 4], 2);
    assert_eq!(
        reply,
        Ok(AdmitReply::Refused(Refused {
            key: 0,
            wait: Some(250 * MS),
            counts: vec![10, 4],
        }))
    );
    // A concurrency cap: room comes with a release, at no predictable time.
    let reply = AdmitReply::decode(&[0, -1, 2, 0, 0, 10, 4], 2);
    assert_eq!(
        reply,
        Ok(AdmitReply::Refused(Refused {
            key: 1,
            wait: None,
            counts: vec![10, 4],
        }))
    );
}

#[test]
fn a_pause_carries_no_counts() {
    assert_eq!(
        AdmitReply::decode(&[0, 3_000_000, 0, 1, 0], 2),
        Ok(AdmitReply::Paused {
            wait: Some(3000 * MS)
        })
    );
    assert_eq!(
        AdmitReply::decode(&[0, 3_000_000, 0, 1, 0], 0),
        Ok(AdmitReply::Paused {
            wait: Some(3000 * MS)
        })
    );
}

#[test]
fn counts_beyond_the_keys_are_ignored_and_negative_ones_are_zero() {
    let reply = AdmitReply::decode(&[0, 1, 1, 0, 0, -3, 8, 99], 2);
    assert_eq!(
        reply,
        Ok(AdmitReply::Refused(Refused {
            key: 0,
            wait: Some(Duration::from_micros(1)),
            counts: vec![0, 8],
        }))
    );
}

#[test]
fn answers_the_script_never_gives_are_refused() {
    let bad: &[(&[i64], usize)] = &[
        (&[], 1),
        (&[1, 0, 0, 0], 0),
        // Fewer counts than keys.
        (&[1, 0, 1, 5, 0, 1], 2),
        (&[0, 10, 1, 0, 0], 1),
        // A key index outside the admission's keys.
        (&[1, 0, 3, 5, 0, 1, 1], 2),
        (&[1, 0, -1, 5, 0, 1], 1),
        (&[0, 10, 0, 0, 0, 1], 1),
        (&[0, 10, 2, 0, 0, 1], 1),
        // An unknown status.
        (&[2, 0, 0, 0, 0], 0),
        (&[-1, 0, 1, 0, 0, 1], 1),
    ];
    for (v, keys) in bad {
        assert_eq!(AdmitReply::decode(v, *keys), Err(UnexpectedReply), "{v:?}");
    }
}
