set terminal pngcairo size 1600,1000 font ',10'
set termoption noenhanced
set output '/work/main/bench/results/soak-20261207T092418Z/soak.png'
set datafile separator ','
set datafile missing ''
set key outside right top
set grid
set xlabel 'minutes since load start'
set multiplot layout 2,2 title 'ngx_chat_module soak: soak-20261207T092418Z'
set arrow 1 from 2.500000, graph 0 to 2.500000, graph 1 nohead dt 3 lc rgb 'gray'
set arrow 2 from 5.000000, graph 0 to 5.000000, graph 1 nohead dt 3 lc rgb 'gray'
set title 'worker memory (MiB); second-half fit'
set ylabel 'MiB'
set samples 400
plot '/work/main/bench/results/soak-20261207T092418Z/soak-wide.csv' skip 1 using 1:6 with lines lw 2 lc 1 title 'w6068 RssAnon', \
     '/work/main/bench/results/soak-20261207T092418Z/soak-wide.csv' skip 1 using 1:7 with lines dt 2 lc 1 title 'w6068 VmRSS', \
     (x >= 2.500000 && x <= 5.000000) ? (8951.201975 + 10.642275 * x) / 1024.0 : 1/0 with lines lw 1 lc rgb 'black' title sprintf('w6068 fit %.1f KiB/min', 10.642275), \
     '/work/main/bench/results/soak-20261207T092418Z/soak-wide.csv' skip 1 using 1:10 with lines lw 2 lc 2 title 'w6069 RssAnon', \
     '/work/main/bench/results/soak-20261207T092418Z/soak-wide.csv' skip 1 using 1:11 with lines dt 2 lc 2 title 'w6069 VmRSS', \
     (x >= 2.500000 && x <= 5.000000) ? (8988.587773 + 3.560615 * x) / 1024.0 : 1/0 with lines lw 1 lc rgb 'black' title sprintf('w6069 fit %.1f KiB/min', 3.560615)
set title 'open files per worker'
set ylabel 'fds'
plot '/work/main/bench/results/soak-20261207T092418Z/soak-wide.csv' skip 1 using 1:8 with lines lw 2 lc 1 title 'w6068 fds', \
     '/work/main/bench/results/soak-20261207T092418Z/soak-wide.csv' skip 1 using 1:12 with lines lw 2 lc 2 title 'w6069 fds', \
     '/work/main/bench/results/soak-20261207T092418Z/soak-wide.csv' skip 1 using 1:5 with lines lc rgb 'gray' title 'established (all workers)'
set title 'shared zone ngx_chat_module'
set ylabel 'MiB'
plot '/work/main/bench/results/soak-20261207T092418Z/soak-wide.csv' skip 1 using 1:2 with lines lw 2 lc rgb 'dark-red' title 'slab pages used (MiB)', \
     '/work/main/bench/results/soak-20261207T092418Z/soak-wide.csv' skip 1 using 1:9 with lines dt 2 lc 1 title 'w6068 zone Rss (MiB)', \
     '/work/main/bench/results/soak-20261207T092418Z/soak-wide.csv' skip 1 using 1:13 with lines dt 2 lc 2 title 'w6069 zone Rss (MiB)'
set title 'PostgreSQL client backends'
set ylabel 'connections'
plot '/work/main/bench/results/soak-20261207T092418Z/soak-wide.csv' skip 1 using 1:3 with lines lw 2 title 'all', '/work/main/bench/results/soak-20261207T092418Z/soak-wide.csv' skip 1 using 1:4 with lines lw 2 title 'nginx chat'
unset multiplot
