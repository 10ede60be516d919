//! Power of two choices: pick two distinct candidates at random and keep the less
//! loaded one (ties go to the first pick). Randomness is injected so tests are exact.

use rand::Rng;

/// Index of the chosen candidate among `loads`, or None when there is none.
pub fn choose<R: Rng>(loads: &[usize], rng: &mut R) -> Option<usize> {
    match loads.len() {
        0 => None,
        1 => Some(0),
        n => {
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            Some(if loads[b] < loads[a] { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn picks_the_less_loaded_of_two() {
        let mut rng = StdRng::seed_from_u64(7);
        // With two candidates both are always drawn: the idle one always wins.
        for _ in 0..100 {
            assert_eq!(choose(&[3, 0], &mut rng), Some(1));
            assert_eq!(choose(&[0, 3], &mut rng), Some(0));
        }
        assert_eq!(choose(&[], &mut rng), None);
        assert_eq!(choose(&[9], &mut rng), Some(0));
    }

    #[test]
    fn the_busiest_of_many_is_never_chosen_and_choices_are_seeded() {
        let loads = [1, 1, 1, 5];
        let picks = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..1000)
                .map(|_| choose(&loads, &mut rng).unwrap())
                .collect::<Vec<_>>()
        };
        let a = picks(42);
        assert!(!a.contains(&3), "the most loaded candidate loses every pair");
        assert_eq!(a, picks(42), "same seed, same choices");
        for i in 0..3 {
            let share = a.iter().filter(|&&p| p == i).count();
            assert!(
                (200..=470).contains(&share),
                "candidate {i} chosen {share}/1000 times"
            );
        }
    }
}
