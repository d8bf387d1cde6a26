//! Gives the memory glibc's allocator holds free back to the system.
//!
//! glibc keeps what a thread freed in that thread's arena for reuse, and returns only the top
//! of each heap on its own. After the node's start-up (profile files parsed, every twin document
//! and mapper assignment republished) about half of its idle RSS at 10,000 devices was such
//! freed memory (heaptrack: 46 MB live of 95 MB). `malloc_trim(0)` walks every arena and
//! returns their free pages.

/// Returns free allocator memory to the system; `true` when glibc gave any back. Call it from a
/// quiet moment: glibc locks each arena in turn while it walks them. Elsewhere (musl, other
/// systems) it does nothing and returns `false`: those allocators return memory themselves.
pub fn release_free_memory() -> bool {
    imp::release()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    pub fn release() -> bool {
        // SAFETY: malloc_trim takes no pointers and has no preconditions; glibc serialises it
        // with every other allocator call on the arenas it walks.
        #[allow(unsafe_code)]
        let released = unsafe { libc::malloc_trim(0) };
        released == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub fn release() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_freed_in_bulk_goes_back_to_the_system() {
        // 64 MiB in 64 KiB blocks (below glibc's mmap threshold, so they come from the heap and
        // stay there when freed), every other block kept so the heap cannot just shrink.
        let blocks: Vec<Vec<u8>> = (0..1024).map(|i| vec![i as u8; 64 * 1024]).collect();
        let kept: Vec<Vec<u8>> = blocks
            .into_iter()
            .enumerate()
            .filter_map(|(i, b)| (i % 2 == 0).then_some(b))
            .collect();
        let released = release_free_memory();
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            assert!(released, "glibc gave nothing back after 32 MiB were freed");
        } else {
            assert!(!released);
        }
        assert_eq!(kept.len(), 512);
    }
}
