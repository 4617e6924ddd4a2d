// Dynamic distribution of a graph node's work items over the threads ggml runs it on: each thread takes the next
// unclaimed item until none is left, so a thread slowed down (by another process, a page fault, a busier core)
// takes fewer items instead of holding the node up. ggml gives a custom op only (ith, nth), with no state shared
// across its threads, so the counter is kept here, keyed by the node, from the first thread that arrives until
// the last of the nth threads is done with it. This relies on ggml running every node of a graph on all of its
// nth threads, with a barrier between nodes (ggml-cpu does: n_tasks only plans the work buffer).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>

namespace pysdcpp {

class WorkItems {
public:
    // Every one of the node's nth threads must construct one (ggml runs a custom op on all of them).
    WorkItems(const void* node, int nth, int64_t count) : node_(node), nth_(nth), count_(count) {
        std::lock_guard<std::mutex> lock(mutex());
        counter_ = &counters()[node];
    }
    ~WorkItems() {
        if (counter_->done.fetch_add(1) + 1 == nth_) {  // the last thread: the node is finished everywhere
            std::lock_guard<std::mutex> lock(mutex());
            counters().erase(node_);
        }
    }
    WorkItems(const WorkItems&)            = delete;
    WorkItems& operator=(const WorkItems&) = delete;

    // The next unclaimed item, or -1 when all are taken.
    int64_t next() {
        const int64_t item = counter_->next.fetch_add(1, std::memory_order_relaxed);
        return item < count_ ? item : -1;
    }

private:
    struct Counter {
        std::atomic<int64_t> next{0};
        std::atomic<int> done{0};
    };
    static std::mutex& mutex() {
        static std::mutex m;
        return m;
    }
    static std::map<const void*, Counter>& counters() {
        static std::map<const void*, Counter> c;
        return c;
    }
    const void* node_;
    int nth_;
    int64_t count_;
    Counter* counter_;
};

// A row-wise node's rows (row_len values each) in runs of about 16K values, claimed dynamically as WorkItems;
// fn(r) for each row this thread takes.
template <class F>
void for_each_row(const void* node, int nth, int64_t rows, int64_t row_len, F&& fn) {
    const int64_t per = std::max<int64_t>(1, 16384 / row_len);
    WorkItems items(node, nth, (rows + per - 1) / per);
    for (int64_t item; (item = items.next()) >= 0;) {
        const int64_t r1 = std::min(rows, (item + 1) * per);
        for (int64_t r = item * per; r < r1; r++) {
            fn(r);
        }
    }
}

}  // namespace pysdcpp
