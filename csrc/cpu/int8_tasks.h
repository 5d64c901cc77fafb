// Phases of tasks run inside one parallel region: the scheduling of the LLM.int8 kernels.
//
// A call of int8_linear has up to three dependent phases (find the outlier columns, quantize
// and pack the activations, multiply). Each at::parallel_for is a fork and a join, and on a
// shared machine a join waits for the slowest thread: one whose core another process holds
// may not run for a whole scheduler tick (4 ms here). So the phases share one region: threads
// claim tasks one at a time from a counter per phase, and a thread moves past a phase only
// when every task of it is done, waiting at most for a task another thread has claimed, not
// for that thread's whole share. One join per call, and a descheduled thread's share is taken
// by the others.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "parallel.h"

namespace lowprec::cpu {

class TaskPhases {
 public:
  // run(task, worker): task in [0, count), worker in [0, workers) (for per-worker scratch).
  using Run = std::function<void(int64_t task, int64_t worker)>;

  // Adds a phase after the ones already added. A phase of zero tasks is skipped.
  void add(int64_t count, Run run) {
    if (count > 0) phases_.push_back(std::make_unique<Phase>(count, std::move(run)));
  }

  // Runs every phase on up to `workers` threads (at least one).
  void run(int64_t workers) {
    if (phases_.empty()) return;
    parallel_for(0, std::max<int64_t>(workers, 1), 1, [this](int64_t worker, int64_t) {
      for (const auto& phase : phases_)
        phase->work(worker);
    });
  }

 private:
  struct Phase {
    Phase(int64_t count_, Run run_) : count(count_), run(std::move(run_)) {}
    void work(int64_t worker) {
      for (int64_t task = next.fetch_add(1, std::memory_order_relaxed); task < count;
           task = next.fetch_add(1, std::memory_order_relaxed)) {
        try {
          run(task, worker);
        } catch (...) {
          done.fetch_add(1, std::memory_order_release);  // nobody waits forever on it
          throw;
        }
        done.fetch_add(1, std::memory_order_release);
      }
      while (done.load(std::memory_order_acquire) < count)
        std::this_thread::yield();
    }
    const int64_t count;
    const Run run;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  std::vector<std::unique_ptr<Phase>> phases_;
};

// Per-worker scratch, made by the worker on its first use.
template <typename T>
class WorkerScratch {
 public:
  WorkerScratch(int64_t workers, std::function<T()> make)
      : slots_(std::max<int64_t>(workers, 1)), make_(std::move(make)) {}
  T& get(int64_t worker) {
    auto& slot = slots_[worker];
    if (!slot) slot = std::make_unique<T>(make_());
    return *slot;
  }

 private:
  std::vector<std::unique_ptr<T>> slots_;
  std::function<T()> make_;
};

}  // namespace lowprec::cpu
